"""Pre-training: the task that builds tokenizer, corpus, model, backend and sparsity, and runs the shared loop.

`Trainer` assembles the parts from a validated `Config` and hands them to `modelzoo.train.loop.TrainLoop` (the one
loop that fine-tuning and soft prompting share) as a `LoopTask`: its batches are packed token blocks
(`BlockLoader`), its loss the LM loss, its evaluation the validation loss. At the end it writes the run summary and
the Hugging Face export. Under `torchrun` the loop wraps the model in `DistributedDataParallel` and rank 0 alone
writes (`modelzoo.distributed`).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from modelzoo import runlock
from modelzoo.backends import get_backend, resolve_name
from modelzoo.backends.base import Sparsifier
from modelzoo.config import Config
from modelzoo.data.config import describe
from modelzoo.data.corpus import corpus_files, load_corpus, unigram_loss
from modelzoo.data.loader import BlockLoader, StepBatches, iter_eval
from modelzoo.data.tokenizer import build_tokenizer
from modelzoo.distributed import init_distributed
from modelzoo.errors import ConfigError, ModelZooError
from modelzoo.export.hf import export_hf, load_hf
from modelzoo.flops import flop_report, format_flops
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.restore import restore_model
from modelzoo.train import checkpoint as ckpt
from modelzoo.train.accel import fuses_adamw, prepare_model
from modelzoo.train.budget import resolved
from modelzoo.train.config import TrainConfig, resolved_device
from modelzoo.train.identity import run_identity
from modelzoo.train.loop import Forward, LoopSettings, TrainLoop, build_optimization
from modelzoo.train.mfu import format_fraction, format_gib, mfu

log = logging.getLogger(__name__)

# Keys a resumed run must share with the checkpoint: anything else changes what the saved state means.
RESUME_KEYS = ("model", "sparsity", "tokenizer", "data.seq_len", "task.batch_size", "seed")
COLUMNS = ("step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s", "sparsity", "val_loss", "val_ppl")


@dataclass
class RunSummary:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    val_loss: float
    val_ppl: float
    unigram_loss: float
    sparsity: float | None  # achieved: fraction of exact zeros in the targeted weights
    sparsity_per_param: dict[str, float]
    mask_sparsity: float | None  # fraction the masks prune (below `sparsity` after SET / RigL regrowth)
    average_sparsity: float | None  # the masks' level averaged over the steps trained (a schedule starts lower)
    dense_flops: float
    sparse_flops: float  # sparse-effective, each step at the level its masks held
    final_sparse_flops: float  # the same tokens at the final masks alone
    mfu: float | None  # model FLOPs utilisation over the run (None: no known peak, e.g. on CPU)
    peak_memory_gib: float | None  # peak CUDA memory of any step (None off CUDA)
    checkpoint: str
    export_dir: str | None
    tokens_per_source: dict[str, int]


class Trainer:
    """Builds every part of a pre-training run from a validated `Config`; `fit()` trains it (module docstring)."""

    name = "pretrain"
    unit = "tokens"
    columns = COLUMNS

    def __init__(self, cfg: Config, run_dir: str | Path | None = None) -> None:
        self.cfg = cfg = resolved(cfg, run_dir)  # task.budget and task.auto_resume
        self.task: TrainConfig = cfg.task
        self.run_dir = Path(run_dir or cfg.run_dir)
        device_type = resolved_device(self.task.device)
        self.dist = init_distributed(device_type)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if device_type == "cuda" else device_type)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.dist.is_main:  # one writer per run directory, until fit() ends or the process dies
            runlock.acquire(self.run_dir)
        self.backend = get_backend(cfg.backend.name)
        artifacts = self.run_dir / self.backend.name  # what the backend writes besides checkpoints (cstorch)
        if self.task.resume:
            self.backend.prepare_resume(artifacts, self.run_dir, self.task.keep_checkpoints)
        ckpt.check_run_dir(self.run_dir, resume=self.task.resume)

        with self.dist.main_first():  # rank 0 trains the tokenizer and fills the data cache; the others read them
            self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.data)
            if len(self.tokenizer) > cfg.model.vocab_size:
                raise ConfigError(
                    "model.vocab_size",
                    f"{cfg.model.vocab_size} is smaller than the tokenizer's {len(self.tokenizer)} tokens; "
                    f"set model.vocab_size={len(self.tokenizer)}",
                )
            if self.dist.is_main and not self.task.resume:  # a resume checks it against the checkpoint instead
                self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
            self.corpus = load_corpus(cfg.data, self.tokenizer)
        self.unigram_loss = unigram_loss(self.corpus.train, self.corpus.validation, cfg.model.vocab_size)

        # The backend's runtime comes first: cstorch needs it before any sparsity object or optimizer exists.
        self.backend.start(cfg.cluster, self.device, artifacts, self.task.precision)
        torch.manual_seed(cfg.seed)
        self.model = self._build_model().to(self.device)
        forward = self.backend.compile(self.model)
        self.sparsifier = self.backend.sparsifier(cfg.sparsity, cfg.seed) if cfg.sparsity.enabled else None
        if self.sparsifier:
            self.sparsifier.apply(self.model)
        backend = resolve_name(cfg.backend.name)
        prepare_model(self.model, self.task, device_type, backend)  # checkpointing, compile: after the sparsity hooks
        optimizer, scheduler = build_optimization(
            self.model,
            cfg.optim,
            self.task.max_steps,
            self.backend,
            self.sparsifier,
            fuses_adamw(cfg.optim, device_type, backend),
        )
        self.loader = BlockLoader(
            [source.train for source in self.corpus.sources],
            self.task.micro_batch_size,
            seed=cfg.seed,
            weights=[source.weight for source in self.corpus.sources],
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            names=[source.name if cfg.data.sources else describe(cfg.data) for source in self.corpus.sources],
        )
        self.units_per_step = self.task.batch_size * cfg.data.seq_len
        self.loop = TrainLoop(
            task=self,
            model=self.model,
            forward=forward,
            optimizer=optimizer,
            scheduler=scheduler,
            backend=self.backend,
            sparsifier=self.sparsifier,
            settings=LoopSettings(
                max_steps=self.task.max_steps,
                batch_size=self.task.batch_size,
                micro_batch_size=self.task.micro_batch_size,
                precision=self.task.precision,
                grad_clip=cfg.optim.grad_clip,
                log_every=self.task.log_every,
                eval_every=self.task.eval_every,
                checkpoint_every=self.task.checkpoint_every,
                keep_checkpoints=self.task.keep_checkpoints,
                on_nonfinite=self.task.on_nonfinite,
                max_nonfinite_skips=self.task.max_nonfinite_skips,
                flops_per_unit=flop_report(cfg.model, cfg.data.seq_len).dense_per_token,  # dense: masked-dense runs all
                peak_tflops=self.task.peak_tflops,
            ),
            dist=self.dist,
            device=self.device,
            run_dir=self.run_dir,
            config_yaml=OmegaConf.to_yaml(OmegaConf.structured(cfg)),
            mask_names=self.sparsifier.mask_names() if self.sparsifier else [],
            identity=run_identity(cfg, self.tokenizer),
        )
        if self.task.resume:
            self.loop.resume(RESUME_KEYS, "start a new run_dir")

    def _build_model(self) -> GPT:
        if not self.task.init_from:
            return GPT(self.cfg.model)
        model = load_hf(self.task.init_from, self.cfg.model.padded_vocab_multiple)
        for key, value in asdict(self.cfg.model).items():
            if key not in ("name", "dropout", "init_std") and getattr(model.config, key) != value:
                raise ConfigError(
                    f"model.{key}",
                    f"{value} differs from {getattr(model.config, key)} in task.init_from={self.task.init_from}",
                )
        return model

    # ---- the loop's task ----------------------------------------------------------------------------
    def batches(self) -> StepBatches:
        return StepBatches(self.loader, self.loop.accumulation)

    def loss(self, forward: Forward, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return forward(inputs, targets)[1]

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Mean validation loss (nats/token) over `task.eval_batches` batches (all if unset), shared among ranks."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x tokens, tokens
        batches = iter_eval(self.corpus.validation, self.task.micro_batch_size, self.task.eval_batches)
        for i, (x, y) in enumerate(batches):
            if i % self.dist.world_size != self.dist.rank:
                continue
            with self.loop.autocast:
                _, loss = self.model(x.to(self.device), y.to(self.device))
            sums += torch.tensor([float(loss) * y.numel(), y.numel()], dtype=torch.float64, device=self.device)
        total, count = self.dist.sum(sums).tolist()
        return {"val_loss": total / count, "val_ppl": perplexity(total / count)}

    def corpus_files(self) -> tuple[Path, Path]:
        """The prepared train and validation shards of the corpus, which a CS-2's input workers read."""
        return corpus_files(self.corpus)

    def protected_checkpoints(self) -> tuple[str, ...]:
        return ()

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])

    # ---- the run ------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.loop.step

    def fit(self) -> RunSummary | None:
        """Train (or, for `cluster.mode` compile_only / validate_only, let the backend lower one step) and
        summarise; None when nothing trained. A resumed finished run: see `_finished_summary`."""
        try:
            if self.step >= self.task.max_steps:
                return self._finished_summary()
            self._log_header()
            if self.backend.run(self.loop):
                return self._finish(self.loop.last_eval.get("val_loss", math.nan))
        finally:
            if self.dist.is_main:
                runlock.release(self.run_dir)
        for program in self.backend.lowering_left():
            lower_in_new_process(self.cfg, program, self.run_dir / self.backend.name / f"lower-{program}")
        return None

    def _finished_summary(self) -> RunSummary:
        """A resumed run already at `task.max_steps`: its summary, nothing changed; or, when it was stopped
        after its last checkpoint but before its summary, the summary (and export) it did not write."""
        summary = self.run_dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text())["steps"] == self.step:
            log.info(
                "%s already finished at step %d (task.max_steps=%d): nothing to do, nothing changed; "
                "raise task.max_steps to train further",
                self.run_dir,
                self.step,
                self.task.max_steps,
            )
            return RunSummary(**json.loads(summary.read_text()))
        return self._finish(self.evaluate(self.step)["val_loss"])

    def sparsity(self) -> tuple[float | None, dict[str, float]]:
        if not self.sparsifier:
            return None, {}
        stats = self.sparsifier.stats()
        return stats.global_sparsity, stats.per_param

    def trained_model(self) -> tuple[GPT, Sparsifier | None]:
        """The trained model on the host and its sparsity plug-in: the live ones, or where the weights stay on the
        device (a CS-2) those of the last checkpoint."""
        if self.backend.weights_on_host:
            return self.model, self.sparsifier
        restored = restore_model(ckpt.latest_checkpoint(self.run_dir))
        return restored.model, restored.sparsifier

    # ---- reporting ----------------------------------------------------------------------------------
    def _log_header(self) -> None:
        m: GPTConfig = self.cfg.model
        n_sparse = len(self.sparsifier.mask_names()) if self.sparsifier else 0
        log.info(
            "model %s: %d layers, d_model %d, %.2fM parameters (%.2fM non-embedding); %d sparse weight tensors",
            m.name,
            m.n_layer,
            m.n_embd,
            self.model.num_params(non_embedding=False) / 1e6,
            self.model.num_params() / 1e6,
            n_sparse,
        )
        log.info(
            "backend %s on %s (%s); data %s: %d train / %d validation blocks of %d tokens; %d tokens per step",
            resolve_name(self.cfg.backend.name),
            self.device,
            self.task.precision,
            describe(self.cfg.data),
            len(self.corpus.train),
            len(self.corpus.validation),
            self.cfg.data.seq_len,
            self.units_per_step,
        )

    def _finish(self, val_loss: float) -> RunSummary:
        tokens = self.step * self.units_per_step
        model, sparsifier = self.trained_model()
        stats = sparsifier.stats() if sparsifier else None
        flops = flop_report(self.cfg.model, self.cfg.data.seq_len, self.cfg.sparsity, steps=self.step)
        export_dir = None
        if self.task.export and self.dist.is_main:
            info = self.cfg.sparsity.summary() if self.cfg.sparsity.enabled else {}
            export_dir = str(export_hf(model, self.run_dir / "hf", self.tokenizer, {**info, "step": self.step}))
        summary = RunSummary(
            steps=self.step,
            tokens=tokens,
            seconds=self.loop.train_seconds,
            tokens_per_s=tokens / max(self.loop.train_seconds, 1e-9),
            val_loss=val_loss,
            val_ppl=perplexity(val_loss),
            unigram_loss=self.unigram_loss,
            sparsity=stats.global_sparsity if stats else None,
            sparsity_per_param=stats.per_param if stats else {},
            mask_sparsity=stats.mask_sparsity if stats else None,
            average_sparsity=flops.average_sparsity if stats else None,
            dense_flops=flops.dense_per_token * tokens,
            sparse_flops=flops.sparse_per_token * tokens,
            final_sparse_flops=flops.final_per_token * tokens,
            mfu=mfu(flops.dense_per_token, tokens / max(self.loop.train_seconds, 1e-9), self.loop.peak_flops_total),
            peak_memory_gib=self.loop.peak_memory_gib,
            checkpoint=str(ckpt.latest_checkpoint(self.run_dir)),
            export_dir=export_dir,
            tokens_per_source=self.loader.tokens_per_source(self.cfg.data.seq_len),
        )
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
            log.info("\n%s", format_summary(summary))
        return summary


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float (a diverging run's loss of 1e9 is no reason to crash)."""
    return math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf


def format_summary(s: RunSummary) -> str:
    sparsity = "dense"
    if s.sparsity is not None:
        sparsity = f"{s.sparsity:.1%} of targeted weights are zero, masks prune {s.mask_sparsity:.1%}"
    flops = f"{s.dense_flops / s.sparse_flops:.2f}x fewer"
    if not math.isclose(s.sparse_flops, s.final_sparse_flops, rel_tol=1e-9):
        flops += (
            f" over the run, masks {s.average_sparsity:.1%} sparse on average; the final masks alone would give "
            f"{s.dense_flops / s.final_sparse_flops:.2f}x"
        )
    lines = [
        "=" * 72,
        f"steps            {s.steps:,}  ({s.tokens:,} tokens, {s.seconds:.0f} s training, {s.tokens_per_s:,.0f} tok/s)",
        f"validation       loss {s.val_loss:.4f}, perplexity {s.val_ppl:.2f}  (unigram baseline: loss "
        f"{s.unigram_loss:.4f}, perplexity {math.exp(s.unigram_loss):.1f})",
        f"sparsity         {sparsity}",
        f"training FLOPs   dense {format_flops(s.dense_flops)}, sparse-effective {format_flops(s.sparse_flops)} "
        f"({flops})",
        f"device use       MFU {format_fraction(s.mfu)} (dense model FLOPs over the device's dense peak), peak "
        f"memory {format_gib(s.peak_memory_gib)}",
        f"checkpoint       {s.checkpoint}",
    ]
    if len(s.tokens_per_source) > 1:
        seen = ", ".join(f"{name} {n:,} ({n / max(s.tokens, 1):.1%})" for name, n in s.tokens_per_source.items())
        lines.insert(2, f"tokens/source    {seen}")
    if s.export_dir:
        lines.append(f"hugging face     {s.export_dir}  (AutoModelForCausalLM.from_pretrained loads it)")
    lines.append("=" * 72)
    return "\n".join(lines)


def lower_in_new_process(cfg: Config, program: str, run_dir: Path) -> None:
    """Lower one program (`cluster.programs`) of a lowering run in a fresh process, writing under `run_dir`: cstorch
    2.10 aborts a process at its second remote compile, so under compile_only each program needs its own."""
    child = replace(cfg, cluster=replace(cfg.cluster, programs=[program]), run_dir=str(run_dir))
    process = multiprocessing.get_context("spawn").Process(target=_fit, args=(child,))
    process.start()
    process.join()
    if process.exitcode:
        raise ModelZooError(f"lowering the {program} step in a new process failed (exit code {process.exitcode})")


def _fit(cfg: Config) -> None:
    Trainer(cfg).fit()

"""`modelzoo pretrain`: the task that builds tokenizer, corpus, model, backend and sparsity, and runs the shared loop.

`Pretraining` assembles the parts from a validated `Config` and hands them to `modelzoo.train.loop.TrainLoop` (the one
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
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from modelzoo import checkpoint as ckpt
from modelzoo import runlock
from modelzoo.backends import get_backend
from modelzoo.backends.base import Sparsifier
from modelzoo.config import Config, register_configs, to_object
from modelzoo.config.train import TrainConfig
from modelzoo.data.config import describe, with_own_files_defaults
from modelzoo.data.corpus import corpus_files, load_corpus, unigram_loss
from modelzoo.data.loader import BlockLoader, StepBatches, iter_eval
from modelzoo.data.tokenizer import build_tokenizer
from modelzoo.distributed import shutdown
from modelzoo.errors import ConfigError, ModelZooError
from modelzoo.exits import fail, fail_unexpected
from modelzoo.export.hf import export_hf, load_hf
from modelzoo.flops import flop_report, format_flops
from modelzoo.init_from import with_init_from
from modelzoo.models.registry import CausalLM, build_model
from modelzoo.restore import build_model as build_restored
from modelzoo.restore import restore_model
from modelzoo.train.accel import fuses_adamw, prepare_model
from modelzoo.train.assemble import assemble_loop, open_run
from modelzoo.train.budget import resolved
from modelzoo.train.distill import build_distiller
from modelzoo.train.identity import run_identity
from modelzoo.train.loop import Forward, LoopSettings
from modelzoo.train.metrics import perplexity
from modelzoo.train.mfu import format_fraction, format_gib, mfu
from modelzoo.validate import validate, validated_config

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


class Pretraining:
    """Builds every part of a pre-training run from a validated `Config`; `fit()` trains it (module docstring)."""

    name = "pretrain"
    unit = "tokens"

    def __init__(self, cfg: Config, run_dir: str | Path | None = None) -> None:
        self.cfg = cfg = resolved(cfg, run_dir)  # task.budget and task.auto_resume
        self.task: TrainConfig = cfg.task
        self.backend = get_backend(cfg.backend.name)
        own_compiler = self.backend.capabilities.own_compiler
        self.place = place = open_run(
            self.task.device, Path(run_dir or cfg.run_dir), self.task.resume, self.backend, self.task.keep_checkpoints
        )
        self.run_dir, self.dist, self.device = place.run_dir, place.dist, place.device

        with self.dist.main_first():  # rank 0 trains the tokenizer and fills the data cache; the others read them
            self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.data)
            if len(self.tokenizer) > cfg.model.vocab_size:
                raise ConfigError(
                    "model.vocab_size",
                    f"{cfg.model.vocab_size} is smaller than the tokenizer's {len(self.tokenizer)} tokens; "
                    f"set model.vocab_size={len(self.tokenizer)}",
                )
            self.corpus = load_corpus(cfg.data, self.tokenizer)
        self.unigram_loss = unigram_loss(self.corpus.train, self.corpus.validation, cfg.model.vocab_size)

        # The backend's runtime comes first: cstorch needs it before any sparsity object or optimizer exists.
        self.backend.start(cfg, self.device, self.run_dir)
        torch.manual_seed(cfg.seed)
        self.model = self._build_model().to(self.device)
        forward = self.backend.compile(self.model)
        self.sparsifier = self.backend.sparsifier(cfg.sparsity, cfg.seed) if cfg.sparsity.enabled else None
        if self.sparsifier:
            self.sparsifier.apply(self.model)
        # The teacher's hooks go on before the student is compiled; its terms are columns after train_loss.
        self.distiller = (
            build_distiller(self.task.distill, self.model, self.tokenizer, self.device)
            if self.task.distill.enabled
            else None
        )
        self.columns = COLUMNS[:3] + (self.distiller.terms if self.distiller else ()) + COLUMNS[3:]
        sharded = self.task.parallelism == "fsdp" and self.dist.enabled
        prepare_model(self.model, self.task, self.device.type, own_compiler, sharded)  # after the sparsity hooks
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
        flops_per_token = flop_report(cfg.model, cfg.data.seq_len).dense_per_token  # dense: masked-dense runs all
        self.loop = assemble_loop(
            place,
            task=self,
            model=self.model,
            forward=forward,
            backend=self.backend,
            sparsifier=self.sparsifier,
            optim=cfg.optim,
            settings=LoopSettings.of(self.task, cfg.optim.grad_clip, flops_per_unit=flops_per_token),
            config=cfg,
            tokenizer=self.tokenizer,
            mask_names=self.sparsifier.mask_names() if self.sparsifier else [],
            resume=(RESUME_KEYS, "start a new run_dir") if self.task.resume else None,
            fused=fuses_adamw(cfg.optim, self.device.type, own_compiler),
            identity=run_identity(cfg, self.tokenizer),
            parallelism=self.task.parallelism,
        )

    def _build_model(self) -> CausalLM:
        if not self.task.init_from:
            return build_model(self.cfg.model)
        model = load_hf(self.task.init_from, self.cfg.model.padded_vocab_multiple)
        if model.config.family != self.cfg.model.family:
            raise ConfigError(
                "model.family",
                f"{self.cfg.model.family} differs from {model.config.family} in task.init_from={self.task.init_from}",
            )
        for key, value in vars(self.cfg.model).items():  # not asdict: it turns a nested RopeScaling into a dict
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
        if self.distiller:
            return self.distiller.loss(forward, inputs, targets)
        return forward(inputs, targets)[1]

    def loss_terms(self) -> dict[str, torch.Tensor]:
        return self.distiller.take_terms() if self.distiller else {}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Mean validation loss (nats/token) over `task.eval_batches` batches (all if unset), shared among ranks."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x tokens, tokens
        batches = iter_eval(self.corpus.validation, self.task.micro_batch_size, self.task.eval_batches)
        first, seen, mine = None, 0, 0
        for i, (x, y) in enumerate(batches):
            first, seen = first or (x, y), i + 1
            if i % self.dist.world_size != self.dist.rank:
                continue
            with self.loop.autocast:
                _, loss = self.model(x.to(self.device), y.to(self.device))
            sums += torch.tensor([float(loss) * y.numel(), y.numel()], dtype=torch.float64, device=self.device)
            mine += 1
        # Under FSDP every forward is a collective (its all-gathers): a rank with a batch fewer than the others runs one
        # more, on the first batch, and discards it; otherwise the ranks deadlock when the batches do not divide evenly.
        for _ in range(-(-seen // self.dist.world_size) - mine):
            with self.loop.autocast:
                self.model(first[0].to(self.device), first[1].to(self.device))
        total, count = self.dist.sum(sums).tolist()
        return {"val_loss": total / count, "val_ppl": perplexity(total / count)}

    def data_files(self) -> tuple[Path, Path]:
        """The prepared train and validation shards of the corpus (which a CS-2's input workers read)."""
        return corpus_files(self.corpus)

    def data_position(self) -> int:
        """Global samples the loader has delivered."""
        return int(self.loader.state_dict()["sample"])

    def set_data_position(self, samples: int) -> None:
        """Move the loader to after `samples` global samples of one source (a backend streams one)."""
        self.loader.load_state_dict({"sample": samples, "drawn": [samples]})

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
            outcome = self.backend.run(self.loop)
            if outcome.trained:
                return self._finish(self.loop.last_eval.get("val_loss", math.nan))
        finally:
            self.place.release()
        for child in outcome.new_process_runs:
            run_in_new_process(child)
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

    def trained_model(self) -> tuple[CausalLM, Sparsifier | None]:
        """The trained model on the host and its sparsity plug-in: the live ones, or where the weights stay on the
        device (a CS-2) those of the last checkpoint."""
        if self.backend.capabilities.weights_on_host:
            return self.model, self.sparsifier
        restored = restore_model(ckpt.latest_checkpoint(self.run_dir))
        return restored.model, restored.sparsifier

    # ---- reporting ----------------------------------------------------------------------------------
    def _log_header(self) -> None:
        m = self.cfg.model
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
            self.backend.name,
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
        whole = self.loop.parallel.whole_state(model) if self.task.export else None  # FSDP: gathered on rank 0
        if self.task.export and self.dist.is_main:
            if whole is not None:
                model = build_restored(self.cfg)[0]
                model.load_state_dict(whole)
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
        self.place.write_summary(summary)
        if self.dist.is_main:
            log.info("\n%s", format_summary(summary))
        return summary


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


def run_in_new_process(cfg: Config) -> None:
    """Pre-train `cfg` in a fresh (spawned) process, as a backend's `RunOutcome` asks (cstorch 2.10 aborts a process
    at its second remote compile, so under compile_only each program is lowered in its own)."""
    process = multiprocessing.get_context("spawn").Process(target=_fit, args=(cfg,))
    process.start()
    process.join()
    if process.exitcode:
        raise ModelZooError(f"the run in {cfg.run_dir} failed in its own process (exit code {process.exitcode})")


def _fit(cfg: Config) -> None:
    Pretraining(cfg).fit()


def main(overrides: list[str]) -> None:
    """Run as a Hydra application: the run directory gets `.hydra/` (composed config) and a log file.

    Plain overrides are validated (and the run directory checked) once, before Hydra creates anything; with Hydra
    flags (`--cfg`, `--multirun`, ...) Hydra composes on its own and each job is validated as it starts. A multirun
    job whose run directory already holds a run is skipped, saying so, and the sweep goes on (with
    `task.auto_resume=true` the job continues that run instead). Under torchrun only rank 0 writes Hydra's files and
    log.
    """
    checked = not any(arg.startswith("-") for arg in overrides)
    if checked:
        config = resolved(validated_config(overrides, "pretrain"))
        if not int(os.environ.get("RANK", "0")):  # before Hydra writes .hydra/ and the log into the run directory
            runlock.acquire(config.run_dir)
        ckpt.check_run_dir(config.run_dir, resume=config.task.resume)
    register_configs()

    @hydra.main(config_path="pkg://modelzoo.conf", config_name="config", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        try:
            config = to_object(cfg)
            if not checked:
                validate(config)
            Pretraining(config).fit()
        except ckpt.RunExists as e:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                fail(e)
            log.warning("multirun job %d skipped: %s; task.auto_resume=true continues it", HydraConfig.get().job.num, e)
        except (ModelZooError, OmegaConfBaseException) as e:
            fail(e)
        except Exception as e:
            fail_unexpected(e)
        finally:
            shutdown()

    quiet = ["hydra.output_subdir=null", "hydra/job_logging=none"] if int(os.environ.get("RANK", "0")) else []
    # Hydra's parser wants its flags (`-m`, `--cfg job`, ...) before one run of overrides.
    plain = [a for a in overrides if "=" in a and not a.startswith("-")]
    flags = [a for a in overrides if a not in plain]
    sys.argv = [
        "modelzoo pretrain",
        *flags,
        *with_own_files_defaults(with_init_from(["task=pretrain", *plain])),
        *quiet,
    ]
    run()

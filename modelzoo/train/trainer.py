"""The pre-training loop: data, model, backend, sparsity, AdamW, checkpoints, metrics, export.

One optimizer step is `_train_step`: `batch_size / micro_batch_size` micro-batches of forward+backward
(gradients accumulate), grad-norm clipping, optimizer step, schedule step. The backend may wrap it
(`Backend.wrap_step`; the Cerebras backend traces it). Sparsity acts through hooks the plug-in put on the
model and optimizer, so the step itself knows nothing of masks. Distribution would wrap the model and
shard the loader (`BlockLoader` takes rank / world_size); the model is never touched. Under `torchrun` the
model is wrapped in `DistributedDataParallel` and rank 0 alone writes (`modelzoo.distributed`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from modelzoo.backends import get_backend, resolve_name
from modelzoo.backends.cerebras import LoweringReport
from modelzoo.config import Config, resolved_device
from modelzoo.data.config import describe
from modelzoo.data.corpus import load_corpus, unigram_loss
from modelzoo.data.loader import BlockLoader, StepBatches, iter_eval
from modelzoo.data.tokenizer import build_tokenizer
from modelzoo.distributed import init_distributed
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.export.hf import export_hf, load_hf
from modelzoo.flops import flop_report, format_flops
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.sparsity.plugin import MASK_SUFFIX
from modelzoo.train import checkpoint as ckpt
from modelzoo.train.config import TrainConfig
from modelzoo.train.metrics import MetricsLogger
from modelzoo.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# Keys a resumed run must share with the checkpoint: anything else changes what the saved state means.
RESUME_KEYS = ("model", "sparsity", "tokenizer", "data.seq_len", "task.batch_size", "seed")


@dataclass
class RunSummary:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    val_loss: float
    val_ppl: float
    unigram_loss: float
    sparsity: float | None
    sparsity_per_param: dict[str, float]
    dense_flops: float
    sparse_flops: float
    checkpoint: str
    export_dir: str | None
    tokens_per_source: dict[str, int]


class Trainer:
    """Builds every part from a validated `Config` and runs `fit()`."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.task: TrainConfig = cfg.task
        self.run_dir = Path(run_dir or cfg.run_dir)
        device_type = resolved_device(self.task.device)
        self.dist = init_distributed(device_type)
        self.accumulation = self.task.batch_size // (self.task.micro_batch_size * self.dist.world_size)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if device_type == "cuda" else device_type)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        ckpt.check_run_dir(self.run_dir, resume=self.task.resume)

        with self.dist.main_first():  # rank 0 trains the tokenizer and fills the data cache; the others read them
            self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.data)
            if len(self.tokenizer) > cfg.model.vocab_size:
                raise ConfigError(
                    "model.vocab_size",
                    f"{cfg.model.vocab_size} is smaller than the tokenizer's {len(self.tokenizer)} tokens; "
                    f"set model.vocab_size={len(self.tokenizer)}",
                )
            if self.dist.is_main:
                self.tokenizer.save_pretrained(self.run_dir / "tokenizer")
            self.corpus = load_corpus(cfg.data, self.tokenizer)
        self.unigram_loss = unigram_loss(self.corpus.train, self.corpus.validation, cfg.model.vocab_size)

        # The backend's runtime comes first: cstorch needs it before any sparsity object or optimizer exists.
        self.backend = get_backend(cfg.backend.name)
        self.backend.start(
            cfg.cluster,
            self.device,
            self.run_dir / "cerebras",
            compile_only=cfg.compile_only,
            validate_only=cfg.validate_only,
        )
        torch.manual_seed(cfg.seed)
        self.model = self._build_model().to(self.device)
        self.forward = self.backend.compile(self.model)
        self.sparsifier = self.backend.sparsifier(cfg.sparsity, cfg.seed) if cfg.sparsity.enabled else None
        if self.sparsifier:
            self.sparsifier.apply(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.backend.optimizer_class())
        if self.sparsifier:
            self.sparsifier.apply_optimizer(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.task.max_steps)
        self.loader = BlockLoader(
            [source.train for source in self.corpus.sources],
            self.task.micro_batch_size,
            seed=cfg.seed,
            weights=[source.weight for source in self.corpus.sources],
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            names=[source.name if cfg.data.sources else describe(cfg.data) for source in self.corpus.sources],
        )
        # Gradients are averaged over ranks by DDP; masks are buffers that every rank updates identically.
        self.replica = DistributedDataParallel(self.model, broadcast_buffers=False) if self.dist.enabled else None
        self.tokens_per_step = self.task.batch_size * cfg.data.seq_len
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.task.precision == "bf16" else nullcontext()
        )
        self.flops = flop_report(cfg.model, cfg.data.seq_len, cfg.sparsity)
        self.step = 0
        self.train_seconds = 0.0
        self.train_step = self.backend.wrap_step(self._train_step, self._end_step)
        if self.task.resume:
            self._resume()
        self.metrics = (
            MetricsLogger(self.run_dir, resume_step=self.step if self.task.resume else None)
            if self.dist.is_main
            else None
        )

    # ---- construction -------------------------------------------------------------------------------
    def _build_model(self) -> GPT:
        if not self.task.init_from:
            return GPT(self.cfg.model)
        model = load_hf(self.task.init_from)
        for key, value in asdict(self.cfg.model).items():
            if key not in ("name", "dropout", "init_std") and getattr(model.config, key) != value:
                raise ConfigError(
                    f"model.{key}",
                    f"{value} differs from {getattr(model.config, key)} in task.init_from={self.task.init_from}",
                )
        return model

    # ---- one optimizer step -------------------------------------------------------------------------
    def _train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over the micro-batches of one batch, clip, step. Returns (mean loss, grad norm)."""
        self.model.train()
        losses = []
        for i in range(self.accumulation):
            x, y = inputs[i], targets[i]
            # DDP all-reduces the gradients once, on the last micro-batch of the step.
            last = i == self.accumulation - 1
            with self.autocast, nullcontext() if self.replica is None or last else self.replica.no_sync():
                _, loss = (self.replica or self.forward)(x, y)
            (loss / self.accumulation).backward()
            losses.append(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).sum() / self.accumulation, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss (nats/token) over `task.eval_batches` batches (all if unset), shared among ranks."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss x tokens, tokens
        batches = iter_eval(self.corpus.validation, self.task.micro_batch_size, self.task.eval_batches)
        for i, (x, y) in enumerate(batches):
            if i % self.dist.world_size != self.dist.rank:
                continue
            with self.autocast:
                _, loss = self.model(x.to(self.device), y.to(self.device))
            sums += torch.tensor([float(loss) * y.numel(), y.numel()], dtype=torch.float64, device=self.device)
        total, count = self.dist.sum(sums).tolist()
        return total / count

    def sparsity(self) -> tuple[float | None, dict[str, float]]:
        if not self.sparsifier:
            return None, {}
        stats = self.sparsifier.stats()
        return stats.global_sparsity, stats.per_param

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self) -> RunSummary:
        t = self.task
        self._log_header()
        self._val_loss = math.nan
        self._window_start, self._window_steps = time.perf_counter(), 0
        # In a log file (no terminal) refresh the bar every 30 s instead of many times a second.
        refresh = 0.1 if sys.stderr.isatty() else 30.0
        self._bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            desc="pretrain",
            unit="step",
            mininterval=refresh,
            disable=not self.dist.is_main,
        )
        with self._bar:
            for batch in self.backend.batches(
                StepBatches(self.loader, self.accumulation), t.max_steps - self.step, self.device
            ):
                self.train_step(*batch)
        if self.metrics:
            self.metrics.close()
        self.dist.barrier()  # the last checkpoint is complete before any rank reads `latest`
        return self._finish(self._val_loss)

    def lower(self) -> LoweringReport:
        """`compile_only` / `validate_only` (backend=cerebras cluster=cs2): one training step is lowered for the
        CS-2 here and handed to the cluster's compiler; nothing trains, nothing is saved."""
        step = self.backend.wrap_step(self._train_step, lambda *results: None)

        def one_step() -> None:
            for batch in self.backend.batches(StepBatches(self.loader, self.accumulation), 1, self.device):
                step(*batch)

        names = [n.removesuffix(MASK_SUFFIX) for n in self.sparsifier.mask_names()] if self.sparsifier else []
        return self.backend.lower(one_step, names, self.cfg.cluster)

    def _end_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """After each optimizer step (the Cerebras backend calls it from a step closure): log, evaluate, save."""
        t = self.task
        self.step += 1
        self._window_steps += 1
        self._bar.update(1)
        row: dict[str, float] = {}
        if self.step % t.log_every == 0 or self.step == t.max_steps:
            elapsed = time.perf_counter() - self._window_start
            self.train_seconds += elapsed
            sparsity, _ = self.sparsity()
            row.update(
                train_loss=float(self.dist.mean(loss)),
                lr=self.scheduler.get_last_lr()[0],
                grad_norm=float(grad_norm),
                tokens_per_s=self._window_steps * self.tokens_per_step / elapsed,
            )
            if sparsity is not None:
                row["sparsity"] = sparsity
            self._bar.set_postfix(
                refresh=False,
                loss=f"{row['train_loss']:.3f}",
                tok_s=f"{row['tokens_per_s']:,.0f}",
                **({"sparsity": f"{sparsity:.1%}"} if sparsity is not None else {}),
            )
        if self.step % t.eval_every == 0 or self.step == t.max_steps:
            self._val_loss = self.evaluate()
            row.update(val_loss=self._val_loss, val_ppl=math.exp(self._val_loss))
            if self.metrics:
                self._bar.write(f"step {self.step}: val loss {self._val_loss:.4f}, ppl {math.exp(self._val_loss):.2f}")
                self.metrics.log_scalars(self.step, "sparsity", self.sparsity()[1])
        if row and self.metrics:
            self.metrics.log(self.step, tokens=self.step * self.tokens_per_step, **row)
        if self.dist.is_main and (self.step % t.checkpoint_every == 0 or self.step == t.max_steps):
            self.save()
        if "train_loss" in row:
            self._window_start, self._window_steps = time.perf_counter(), 0

    # ---- checkpoints --------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "sparsity": self.sparsifier.state_dict() if self.sparsifier else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate(),
                "numpy": np.random.get_state(),
            },
        }

    def save(self) -> Path:
        config_yaml = OmegaConf.to_yaml(OmegaConf.structured(self.cfg))
        return ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer.state_dict(),
            self.trainer_state(),
            config_yaml,
            keep=self.task.keep_checkpoints,
        )

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir)
        ckpt.verify_checkpoint(path)
        self._check_same_config(path)
        ckpt.load_model_weights(path, self.model, self.sparsifier.mask_names() if self.sparsifier else [])
        optimizer_state, state = ckpt.load_training_state(path)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        if self.sparsifier:
            self.sparsifier.load_state_dict(state["sparsity"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        self.step = state["step"]
        self.train_seconds = state["train_seconds"]
        log.info("resumed from %s at step %d", path, self.step)

    def _check_same_config(self, path: Path) -> None:
        saved = OmegaConf.create(ckpt.read_config(path))
        current = OmegaConf.structured(self.cfg)
        for key in RESUME_KEYS:
            a, b = OmegaConf.select(saved, key), OmegaConf.select(current, key)
            if a != b:
                raise CheckpointError(
                    f"{path} was trained with {key}={_plain(a)} but the config has {key}={_plain(b)}; "
                    "resume with the original value or start a new run_dir"
                )

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
            self.tokens_per_step,
        )

    def _finish(self, val_loss: float) -> RunSummary:
        tokens = self.step * self.tokens_per_step
        sparsity, per_param = self.sparsity()
        export_dir = None
        if self.task.export and self.dist.is_main:
            info = self.cfg.sparsity.summary() if self.cfg.sparsity.enabled else {}
            export_dir = str(export_hf(self.model, self.run_dir / "hf", self.tokenizer, {**info, "step": self.step}))
        summary = RunSummary(
            steps=self.step,
            tokens=tokens,
            seconds=self.train_seconds,
            tokens_per_s=tokens / max(self.train_seconds, 1e-9),
            val_loss=val_loss,
            val_ppl=math.exp(val_loss),
            unigram_loss=self.unigram_loss,
            sparsity=sparsity,
            sparsity_per_param=per_param,
            dense_flops=self.flops.dense_per_token * tokens,
            sparse_flops=self.flops.sparse_per_token * tokens,
            checkpoint=str(ckpt.latest_checkpoint(self.run_dir)),
            export_dir=export_dir,
            tokens_per_source=self.loader.tokens_per_source(self.cfg.data.seq_len),
        )
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
            log.info("\n%s", format_summary(summary))
        return summary


def _plain(value: object) -> object:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def format_summary(s: RunSummary) -> str:
    sparsity = "dense" if s.sparsity is None else f"{s.sparsity:.1%} of targeted weights are zero"
    lines = [
        "=" * 72,
        f"steps            {s.steps:,}  ({s.tokens:,} tokens, {s.seconds:.0f} s training, {s.tokens_per_s:,.0f} tok/s)",
        f"validation       loss {s.val_loss:.4f}, perplexity {s.val_ppl:.2f}  (unigram baseline: loss "
        f"{s.unigram_loss:.4f}, perplexity {math.exp(s.unigram_loss):.1f})",
        f"sparsity         {sparsity}",
        f"training FLOPs   dense {format_flops(s.dense_flops)}, sparse-effective {format_flops(s.sparse_flops)} "
        f"({s.dense_flops / s.sparse_flops:.2f}x fewer)",
        f"checkpoint       {s.checkpoint}",
    ]
    if len(s.tokens_per_source) > 1:
        seen = ", ".join(
            f"{name} {tokens:,} ({tokens / max(s.tokens, 1):.1%})" for name, tokens in s.tokens_per_source.items()
        )
        lines.insert(2, f"tokens/source    {seen}")
    if s.export_dir:
        lines.append(f"hugging face     {s.export_dir}  (AutoModelForCausalLM.from_pretrained loads it)")
    lines.append("=" * 72)
    return "\n".join(lines)

"""The one training loop: pre-training, fine-tuning and soft prompting all run through `TrainLoop`.

A task brings what is its own (`LoopTask`: batches, the loss of one micro-batch, evaluation, the state it
checkpoints); the loop does the rest, the same for every task:

- one optimizer step (`train_step`): `batch_size / (micro_batch_size x ranks)` micro-batches of forward and
  backward under autocast (gradients accumulate; under torchrun the data-parallel plug-in, `modelzoo.train.parallel`,
  all-reduces them once, on the last one (DDP), or reduce-scatters each one's into sharded gradients (FSDP2)), gradient
  clipping over the trainable parameters, optimizer and schedule step. The backend may wrap it
  (`Backend.wrap_step`: the Cerebras backend traces it) and feeds it (`Backend.batches`);
- device setup (`modelzoo.train.accel.setup_device`): TF32 matmuls on CUDA;
- bookkeeping after each step (`end_step`): the progress bar, a metrics row every `log_every` steps (with MFU and
  peak CUDA memory, `modelzoo.train.mfu`), the task's
  evaluation every `eval_every`, an atomic checkpoint every `checkpoint_every` and at the last step (rank 0);
- exact resume (`resume`): weights and masks, optimizer, schedule, the task's state (data position, model
  selection), sparsity state and RNG states; the config's optimizer hyperparameters apply, and a checkpoint of
  another run (`modelzoo.train.identity`) or holding NaN/Inf is refused;
- non-finite steps stop the run or skip their update (`modelzoo.train.guards`), and nothing non-finite is saved.

Sparsity acts through hooks the plug-in put on the model and optimizer, so the step knows nothing of masks.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from modelzoo import checkpoint as ckpt
from modelzoo.backends.base import Backend, Sparsifier
from modelzoo.config.train import OptimConfig
from modelzoo.distributed import Distributed
from modelzoo.errors import CheckpointError
from modelzoo.finite import nonfinite_tensors, refuse_nonfinite
from modelzoo.optim import build_optimizer
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.sparsity.shards import full
from modelzoo.train.accel import setup_device
from modelzoo.train.guards import NonFiniteGuard, training_tensors
from modelzoo.train.identity import apply_optimizer_config, check_identity, first_difference, log_optimizer_changes
from modelzoo.train.metrics import MetricsLogger
from modelzoo.train.mfu import format_fraction, format_gib, mfu, peak_flops, take_peak_memory
from modelzoo.train.parallel import Parallelism
from modelzoo.train.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LoopSettings:
    """The loop's part of a task config (`task=pretrain`, `finetune`, `prompt_tune`) and `optim.grad_clip`."""

    max_steps: int
    batch_size: int  # global: sequences (examples) per optimizer step over all ranks
    micro_batch_size: int
    precision: str
    grad_clip: float
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    on_nonfinite: str = "stop"  # `task.on_nonfinite` of pre-training; fine-tuning stops
    max_nonfinite_skips: int = 0
    flops_per_unit: float | None = None  # the model's dense training FLOPs per `unit`, for MFU (None: n/a)
    peak_tflops: float | None = None  # `task.peak_tflops`: the device's dense peak (None: by GPU name)

    @classmethod
    def of(cls, task: object, grad_clip: float, **values: object) -> LoopSettings:
        """The settings a task config (`TrainConfig`, `FinetuneConfig`) names, with `optim.grad_clip`; `values` for
        those it lacks or sets otherwise."""
        named = {f.name: getattr(task, f.name) for f in fields(cls) if hasattr(task, f.name)}
        return cls(**{**named, "grad_clip": grad_clip, **values})


SPEED_COLUMNS = ("mfu", "peak_mem_gib")  # appended to every task's metrics columns; blank where n/a


class LoopTask(Protocol):
    """What a task gives the loop."""

    name: str  # the progress bar's label
    unit: str  # what a step processes, counted in the metrics: "tokens" or "examples"
    units_per_step: int  # of `unit`, over all ranks
    columns: tuple[str, ...]  # the metrics.csv columns

    def batches(self) -> Iterable[tuple[torch.Tensor, ...]]:
        """Endless step batches for this rank, on the CPU: tensors whose first dimension indexes micro-batches."""
        ...

    def loss(self, forward: Forward, *micro_batch: torch.Tensor) -> torch.Tensor:
        """The mean loss of one micro-batch, computed through `forward` (the model, its DDP or compiled form)."""
        ...

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """The parts of the loss (e.g. distillation's `lm_loss`, `kd_loss`), each its mean over this rank's
        micro-batches since the last call; taken after every step, logged as columns of their own. {}: none."""
        ...

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluation metrics at `step` (validation loss; dev score), on every rank."""
        ...

    def protected_checkpoints(self) -> tuple[str, ...]:
        """Checkpoint directories that rotation must keep (e.g. the best step's)."""
        ...

    def state_dict(self) -> dict:
        """The task's resumable state (data position, model selection)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


class StreamingTask(LoopTask, Protocol):
    """A task whose data a backend may stream itself (with input workers of its own), from a global position."""

    def data_position(self) -> int:
        """Global samples delivered so far."""
        ...

    def set_data_position(self, samples: int) -> None: ...

    def data_files(self) -> tuple[Path, Path]:
        """The prepared train and validation shards."""
        ...


def mask_buffer_names(model: nn.Module) -> list[str]:
    """The `<param>_mask` buffers of `model` (what a checkpoint of it must hold)."""
    return [name for name, _ in model.named_buffers() if name.endswith(MASK_SUFFIX)]


def build_optimization(
    model: nn.Module,
    optim: OptimConfig,
    max_steps: int,
    backend: Backend,
    sparsifier: Sparsifier | None,
    fused: bool = False,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `model`'s trainable parameters (the backend's class; `fused`: torch's fused kernel, see
    `modelzoo.train.accel.fuses_adamw`), masked by `sparsifier`, and its schedule (the backend's: cstorch's
    schedulers on the Cerebras backend)."""
    optimizer = build_optimizer(model, optim, backend.optimizer_class(), fused=fused)
    if sparsifier:
        sparsifier.apply_optimizer(optimizer)
    return optimizer, backend.scheduler(optimizer, optim, max_steps)


class TrainLoop:
    """Runs a task's optimizer steps with checkpoints, metrics and exact resume (module docstring)."""

    def __init__(
        self,
        task: LoopTask,
        model: nn.Module,
        forward: Forward,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        backend: Backend,
        sparsifier: Sparsifier | None,
        settings: LoopSettings,
        dist: Distributed,
        device: torch.device,
        run_dir: Path,
        config_yaml: str,
        mask_names: list[str],
        identity: dict | None = None,
        parallel: Parallelism | None = None,
    ) -> None:
        """`identity`: what a resume must keep beyond the config (`modelzoo.train.identity`), None to check none;
        `parallel`: the data-parallel plug-in that already wrapped `model` into `forward` (None: one process)."""
        self.task, self.model, self.optimizer, self.scheduler = task, model, optimizer, scheduler
        self.backend, self.sparsifier, self.settings, self.dist = backend, sparsifier, settings, dist
        self.device, self.run_dir, self.config_yaml, self.mask_names = device, run_dir, config_yaml, mask_names
        self.accumulation = settings.batch_size // (settings.micro_batch_size * dist.world_size)
        self.parallel = parallel or Parallelism()
        self.forward = forward
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.sizes = {name: p.numel() for name, p in model.named_parameters()}  # elements of each parameter
        self.autocast = backend.autocast(device, settings.precision)
        self.scaler = backend.grad_scaler(settings.precision)  # loss scaling (cstorch's, for cbf16 / fp16 on a CS-2)
        setup_device(device)  # TF32 matmuls on CUDA
        peak = peak_flops(device, settings.precision, settings.peak_tflops)  # one device's
        self.peak_flops_total = None if peak is None else peak * dist.world_size
        self.peak_memory_gib: float | None = None  # the largest of any log window on this rank
        self.step = 0
        self.train_seconds = 0.0
        self.last_eval: dict[str, float] = {}
        self.metrics: MetricsLogger | None = None
        self.identity = identity
        self.guard = NonFiniteGuard(settings.on_nonfinite, settings.max_nonfinite_skips, dist)
        self._run_step = backend.wrap_step(self.train_step, self.end_step)

    # ---- one optimizer step -------------------------------------------------------------------------
    def train_step(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward/backward over the micro-batches of one batch, clip, step. Returns (mean loss, grad norm, the
        learning rate this step used)."""
        self.model.train()
        losses = []
        for i in range(self.accumulation):
            # DDP all-reduces the gradients once, on the last micro-batch of the step.
            with self.autocast, self.parallel.micro_batch(last=i == self.accumulation - 1):
                loss = self.task.loss(self.forward, *(t[i] for t in batch))
            scaled = loss / self.accumulation
            (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
            losses.append(loss.detach())
        self.parallel.after_backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = full(torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.grad_clip))
        loss = torch.stack(losses).sum() / self.accumulation
        update = self.guard.allows_update(self.step + 1, loss, grad_norm)
        if update:
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
        # The LR this step used, read after the optimizer step and before the schedule's: on a CS-2 cstorch sets
        # the program's LR inside `optimizer.step()` (a step pre-hook), before it the group holds a host constant.
        # A tensor of the program on cstorch, a float elsewhere.
        lr = self.optimizer.param_groups[0]["lr"]
        if update:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, lr

    def end_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: torch.Tensor | float) -> None:
        """After each optimizer step, on the host: count, log, evaluate, save.

        A backend that runs the step itself hands its values to `after_step` instead, and counts, evaluates and
        saves between its executors.
        """
        self.count_step()
        self.observe(loss, grad_norm)
        sparsity = self.sparsifier.stats().global_sparsity if self.sparsifier and self.log_due() else None
        row = self.train_row(loss, grad_norm, lr, sparsity, self.task.loss_terms())
        if self.eval_due():
            with self.paused():
                row.update(self.record_evaluation(self.task.evaluate(self.step)))
        self.log_row(row)
        if self.save_due():
            with self.paused():
                self.save()
        if "train_loss" in row:
            self.restart_window()

    # ---- the parts of the bookkeeping ---------------------------------------------------------------
    def count_step(self) -> None:
        self.step += 1
        self._window_steps += 1
        self._bar.update(1)

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The non-finite guard sees this step's values, and stops the run before anything is logged, evaluated or
        saved when it must."""
        s = self.settings
        self.guard.observe(self.step, loss, grad_norm)
        if any(self.step % n == 0 for n in (s.log_every, s.eval_every, s.checkpoint_every)) or self.step == s.max_steps:
            self.guard.check()

    def log_due(self) -> bool:
        return self.step % self.settings.log_every == 0 or self.step == self.settings.max_steps

    def eval_due(self) -> bool:
        return self.step % self.settings.eval_every == 0 or self.step == self.settings.max_steps

    def save_due(self) -> bool:
        """Whether this rank writes a checkpoint now (rank 0; every rank its part of a sharded one)."""
        s = self.settings
        writes = self.dist.is_main or self.parallel.sharded_checkpoints
        return writes and (self.step % s.checkpoint_every == 0 or self.step == s.max_steps)

    def train_row(
        self,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        lr: torch.Tensor | float,
        sparsity: float | None,
        terms: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """The metrics of this step where logging is due (else none), from the values handed in (`terms`: the
        task's `loss_terms`, averaged over ranks like the loss) and the host's clock; it reads nothing of the model."""
        if not self.log_due():
            return {}
        elapsed = time.perf_counter() - self._window_start
        self.train_seconds += elapsed
        row = dict(
            train_loss=float(self.dist.mean(loss)),
            **{name: float(self.dist.mean(value)) for name, value in (terms or {}).items()},
            lr=float(lr),
            grad_norm=float(grad_norm),
            **{f"{self.task.unit}_per_s": self._window_steps * self.task.units_per_step / elapsed},
        )
        if sparsity is not None:
            row["sparsity"] = sparsity
        speed = self._speed(row[f"{self.task.unit}_per_s"])
        row.update({k: v for k, v in speed.items() if v is not None})
        self._bar.set_postfix(
            refresh=False,
            loss=f"{row['train_loss']:.3f}",
            **{f"{self.task.unit[:3]}_s": f"{row[f'{self.task.unit}_per_s']:,.0f}"},
            mfu=format_fraction(speed["mfu"]),
            mem=format_gib(speed["peak_mem_gib"]),
            **({"sparsity": f"{row['sparsity']:.1%}"} if "sparsity" in row else {}),
        )
        return row

    def record_evaluation(self, metrics: dict[str, float]) -> dict[str, float]:
        """Keep and print this step's evaluation; per-weight sparsity as scalars where the weights are on the host."""
        self.last_eval = metrics
        # On every rank: with sharded weights the counts are summed over the ranks.
        host = self.sparsifier and self.backend.capabilities.weights_on_host
        per_param = self.sparsifier.stats().per_param if host else {}
        if self.metrics:
            self._bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            self.log_sparsity(per_param)
        return metrics

    def log_evaluation(self, metrics: dict[str, float]) -> None:
        """Keep, print and log an evaluation made at the current step outside `end_step` (by a backend)."""
        self.log_row(self.record_evaluation(metrics))

    def after_step(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: torch.Tensor | float, per_weight: dict[str, float]
    ) -> None:
        """A step's values, handed over after it ran (a backend's step closure): the non-finite guard, and where
        logging is due the metrics row with each sparse weight's level and, weighted by size, all of theirs."""
        self.observe(loss, grad_norm)
        if not self.log_due():
            return
        overall = None
        if per_weight:  # weighted by the sizes counted at construction: a closure reads no weight (on a CS-2)
            total = sum(self.sizes[n] for n in per_weight)
            overall = sum(v * self.sizes[n] for n, v in per_weight.items()) / total
        self.log_row(self.train_row(loss, grad_norm, lr, overall))
        self.log_sparsity(per_weight)
        self.restart_window()

    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task's loss of one evaluation batch through the model's forward, under the run's autocast."""
        with self.autocast:
            return self.task.loss(self.forward, inputs, targets)

    def log_sparsity(self, per_param: dict[str, float]) -> None:
        """Each sparse weight's fraction of zeros, as TensorBoard scalars `sparsity/<name>` (masked_dense: at each
        evaluation; cstorch: at each logged step, from the values its program hands over)."""
        if self.metrics and per_param:
            self.metrics.log_scalars(self.step, "sparsity", per_param)

    def log_row(self, row: dict[str, float]) -> None:
        if row and self.metrics:
            self.metrics.log(self.step, **{self.task.unit: self.step * self.task.units_per_step}, **row)

    def restart_window(self) -> None:
        self._window_start, self._window_steps = time.perf_counter(), 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time inside out of the log window's (training time and tokens/s count training alone, whether
        or not the step also logs)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - started

    def _speed(self, units_per_s: float) -> dict[str, float | None]:
        """MFU over all ranks in this log window, and this rank's peak CUDA memory in it (n/a: None)."""
        memory = take_peak_memory(self.device)
        if memory is not None:
            self.peak_memory_gib = max(memory, self.peak_memory_gib or 0.0)
        flops = self.settings.flops_per_unit
        return {
            "mfu": None if flops is None else mfu(flops, units_per_s, self.peak_flops_total),
            "peak_mem_gib": memory,
        }

    # ---- driving ------------------------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[None]:
        """Metrics file and progress bar around training from the current step (`fit`, or a backend's run)."""
        if self.dist.is_main:
            columns = (*self.task.columns, *SPEED_COLUMNS)
            self.metrics = MetricsLogger(self.run_dir, resume_step=self.step or None, columns=columns)
        self.restart_window()
        # In a log file (no terminal) refresh the bar every 30 s instead of many times a second.
        refresh = 0.1 if sys.stderr.isatty() else 30.0
        self._bar = tqdm(
            total=self.settings.max_steps,
            initial=self.step,
            desc=self.task.name,
            unit="step",
            mininterval=refresh,
            disable=not self.dist.is_main,
        )
        with self._bar:
            yield
        if self.metrics:
            self.metrics.close()
        self.dist.barrier()  # the last checkpoint is complete before any rank reads `latest`

    def fit(self) -> None:
        """Train from the current step to `max_steps` (through the backend's batches and step)."""
        with self.session():
            for batch in self.backend.batches(self.task.batches(), self.settings.max_steps - self.step, self.device):
                self._run_step(*batch)

    def sparse_names(self) -> list[str]:
        return [n.removesuffix(MASK_SUFFIX) for n in self.sparsifier.mask_names()] if self.sparsifier else []

    # ---- the task's data, for a backend that streams it itself (a `StreamingTask`) -------------------------
    def data_position(self) -> int:
        """Global samples the task's data has delivered."""
        return self.task.data_position()

    def set_data_position(self, samples: int) -> None:
        self.task.set_data_position(samples)

    def data_files(self) -> tuple[Path, Path]:
        """The prepared train and validation shards the task reads."""
        return self.task.data_files()

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "scheduler": self.scheduler.state_dict(),
            "task": self.task.state_dict(),
            "sparsity": self.sparsifier.state_dict() if self.sparsifier else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "nonfinite_skips": self.guard.skips,
            "rng": rng_state(),
        }

    def checkpoint_state(self) -> dict:
        """What a checkpoint of this step holds besides model and optimizer: `state_dict`, and the run's record
        (`config_yaml`; `identity`, None when unchecked)."""
        return {"state": self.state_dict(), "config_yaml": self.config_yaml, "identity": self.identity}

    def save(self) -> Path:
        self._refuse_nonfinite(f"step {self.step}", "the checkpoint was not written")
        sharded = self.parallel.sharded_checkpoints
        return ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            get_optimizer_state_dict(self.model, self.optimizer) if sharded else self.optimizer.state_dict(),
            self.state_dict(),
            self.config_yaml,
            keep=self.settings.keep_checkpoints,
            protect=self.task.protected_checkpoints(),
            identity=self.identity,
            shards=self.dist if sharded else None,
        )

    def resume(self, keys: tuple[str, ...], hint: str) -> None:
        """Continue exactly from the run's newest checkpoint, refusing one whose config differs from this run's at
        any of `keys` (what fixes the meaning of the saved state); `hint` says how to start afresh instead."""
        path = ckpt.latest_checkpoint(self.run_dir)
        self._verify(path)
        saved, current = OmegaConf.create(ckpt.read_config(path)), OmegaConf.create(self.config_yaml)
        for key in keys:
            changed = first_difference(
                key, _plain(OmegaConf.select(saved, key)), _plain(OmegaConf.select(current, key))
            )
            if changed is not None:
                name, a, b = changed
                raise CheckpointError(
                    f"{path} was trained with {name}={a} but the config has {name}={b}; "
                    f"resume with the original value or {hint}"
                )
        if self.identity is not None:
            check_identity(path, ckpt.read_identity(path), self.identity)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        lambda_lr = isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR)
        fresh_base_lrs = list(self.scheduler.base_lrs) if lambda_lr else []
        if ckpt.is_sharded(path):
            state = self._load_sharded(path)
        else:
            if self.parallel.sharded_checkpoints:
                raise CheckpointError(
                    f"{path} is a whole-model checkpoint (task.parallelism=ddp); resume it with task.parallelism=ddp"
                )
            ckpt.load_model_weights(path, self.model, self.mask_names)
            optimizer_state, state = ckpt.load_training_state(path)
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        if lambda_lr:  # cstorch's schedulers (backend=cerebras) restore their saved settings with their state
            apply_optimizer_config(self.optimizer, self.scheduler, fresh, fresh_base_lrs)
        log_optimizer_changes(path, _plain(saved.optim), _plain(current.optim))
        self._refuse_nonfinite(path, "point checkpoints/latest at an earlier step_* directory or start afresh")
        self.task.load_state_dict(state["task"])
        if self.sparsifier:
            self.sparsifier.load_state_dict(state["sparsity"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.train_seconds = state["train_seconds"]
        self.guard.skips = state["nonfinite_skips"]
        if self.step > self.settings.max_steps:
            raise CheckpointError(
                f"{path} is at step {self.step}, past task.max_steps={self.settings.max_steps}: raise "
                "task.max_steps to train further"
            )
        log.info("resumed from %s at step %d", path, self.step)

    def _verify(self, path: Path) -> None:
        """Check `path` against its checksum manifest once, on rank 0 (every file of a 7B checkpoint hashed by each of
        8 ranks would read it 8 times), and raise the same `CheckpointError` on every rank if it fails."""
        problem = None
        if self.dist.is_main:
            try:
                ckpt.verify_checkpoint(path)
            except CheckpointError as error:
                problem = str(error)
        problem = self.dist.broadcast(problem)
        if problem is not None:
            raise CheckpointError(problem)

    def _load_sharded(self, path: Path) -> dict:
        """Model and optimizer state of a sharded checkpoint, this rank's part of it (any number of ranks, or one
        process, wrote it); returns the trainer state. Masks are checked as `ckpt.load_model_weights` checks them."""
        ckpt.check_stored_model(path, self.model, self.mask_names)
        # A fresh AdamW has no state to load into: DCP's helper makes it with one zero step of lr 0, which is no
        # training step for the sparsity plug-in (sharded checkpoints come from backends with `fsdp`: MaskedSparsity).
        with self.sparsifier.outside_schedule() if self.sparsifier else nullcontext():
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer)
        model_state = get_model_state_dict(self.model)
        with ckpt.one_process_dcp():
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path / ckpt.DCP_DIR))
        set_model_state_dict(self.model, model_state)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state)
        return ckpt.load_trainer_state(path)

    def _refuse_nonfinite(self, source: object, advice: str) -> None:
        """Refuse NaN or Inf in the model or optimizer state (`refuse_nonfinite`); with sharded state every rank
        checks its rows and all refuse together."""
        named = list(training_tensors(self.model, self.optimizer))
        if self.parallel.sharded_checkpoints and self.dist.enabled:
            here = len(nonfinite_tensors(named))
            if int(self.dist.sum(torch.tensor([here], device=self.device))) and not here:
                raise CheckpointError(f"{source}: another rank's shard holds NaN or Inf values (diverged); {advice}")
        refuse_nonfinite(named, source, advice)


def _plain(value: object) -> object:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

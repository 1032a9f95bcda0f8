"""The training-backend protocol: how a training step runs, where its batches come from, what drives the loop.

A backend owns the runtime (`start`), the model's compiled form (`compile`), the sparsity plug-in and the
optimizer class, the step's execution (`wrap_step`, `batches`) and who drives the loop (`run`). What it supports
and how it behaves is declared in its `Capabilities`, which the rest of the library reads instead of its name. It
knows the loop only through `LoopDriver` (the members of `modelzoo.train.loop.TrainLoop` a backend may use).
Inference converters, which rewrite a loaded model, are apart (`modelzoo.backends.converters`).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from modelzoo.config import Config
from modelzoo.config.train import OptimConfig
from modelzoo.optim import build_scheduler
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import SparsityStats


@dataclass(frozen=True)
class Capabilities:
    """What a training backend supports; checked against the config before anything runs."""

    algorithms: frozenset[str]
    devices: frozenset[str]
    dtypes: frozenset[str]
    # Compiles the step and brings its own optimizer and memory plan: no torch.compile, fused AdamW or activation
    # checkpointing of ours.
    own_compiler: bool = False
    # The host may read the model's weights between steps (not on a CS-2, where they come back in checkpoints).
    weights_on_host: bool = True
    # Data parallel under torchrun (else the backend scales out on its own cluster).
    torchrun: bool = True
    # Its model can be sharded over the torchrun ranks with FSDP2 (`task.parallelism=fsdp`).
    fsdp: bool = True
    # The host sees each step's loss before the update, so task.on_nonfinite=skip can leave an update out.
    host_skips_updates: bool = True
    # Honours the `cluster` node (targets other than `auto`, lowering modes).
    clusters: bool = False
    # Runs a frozen teacher beside the model in the step (`task.distill.teacher`).
    distillation: bool = True


@dataclass(frozen=True)
class RunOutcome:
    """What `Backend.run` did: whether it trained, and runs it asks for in fresh processes (configs to run whole)."""

    trained: bool
    new_process_runs: tuple[Config, ...] = ()


class Sparsifier(Protocol):
    """The plug-in interface every backend's sparsity object offers to the loop."""

    def apply(self, model: nn.Module) -> None: ...
    def apply_optimizer(self, optimizer: torch.optim.Optimizer) -> None: ...
    def mask_names(self) -> list[str]: ...
    def stats(self) -> SparsityStats: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class LoopDriver(Protocol):
    """What a backend may use of the training loop (`modelzoo.train.loop.TrainLoop`), and nothing else."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    settings: Any  # `LoopSettings`: steps, batch sizes, log / eval / checkpoint intervals
    step: int  # optimizer steps done
    run_dir: Path
    accumulation: int  # micro-batches per optimizer step on this rank

    def fit(self) -> None:
        """Train to the last step: steps through `Backend.wrap_step` / `batches`, with logging, evaluation and
        checkpoints."""
        ...

    def sparse_names(self) -> list[str]:
        """The names of the parameters the sparsity plug-in masks."""
        ...

    def train_step(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One optimizer step over a batch of micro-batches: (mean loss, grad norm, learning rate used)."""
        ...

    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task's loss of one evaluation batch, under the run's autocast."""
        ...

    def after_step(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: torch.Tensor | float, per_weight: dict[str, float]
    ) -> None:
        """A step's values, handed over after it ran: the non-finite guard, and where logging is due the metrics
        row with each sparse weight's level (`per_weight`) and their size-weighted mean."""
        ...

    def log_due(self) -> bool: ...
    def count_step(self) -> None: ...
    def save_due(self) -> bool: ...
    def eval_due(self) -> bool: ...

    def log_evaluation(self, metrics: dict[str, float]) -> None:
        """Keep, print and log an evaluation the backend made at the current step."""
        ...

    def session(self) -> AbstractContextManager:
        """Metrics file and progress bar around training from the current step."""
        ...

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint of the current step holds besides model and optimizer: the loop's `state_dict` and
        the run's record (`config_yaml`, `identity`: what a resume must keep)."""
        ...

    def data_position(self) -> int:
        """Global samples the task's data has delivered."""
        ...

    def set_data_position(self, samples: int) -> None: ...

    def data_files(self) -> tuple[Path, Path]:
        """The prepared train and validation shards the task reads (for input workers of the backend's own)."""
        ...


class Backend(ABC):
    """One way of running (sparse) training."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, as one sentence with a fix; None when it can."""
        return None

    @classmethod
    def is_available(cls) -> bool:
        """Whether this backend's libraries import on this machine."""
        return cls.unavailable_reason() is None

    @classmethod
    def check_config(cls, cfg: Config, device: str) -> None:
        """Refuse, before any compute, pre-training config values this backend cannot honour on `device` (a
        `ConfigError` naming the key); what its `Capabilities` express is checked by `modelzoo.validate`."""
        return None

    @abstractmethod
    def sparsifier(self, config: SparsityConfig, seed: int) -> Sparsifier:
        """The sparsity plug-in for `config` (only called when sparsity is enabled)."""

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        """The AdamW implementation the loop builds (cstorch needs its own)."""
        return torch.optim.AdamW

    def scheduler(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> Any:
        """The learning-rate schedule of `cfg` over `max_steps`, stepped once per optimizer step: torch's
        `LambdaLR` of `lr_factor` by default (cstorch's own schedulers on the Cerebras backend)."""
        return build_scheduler(optimizer, cfg, max_steps)

    def start(self, cfg: Config, device: torch.device, run_dir: Path) -> None:
        """Set up the runtime of a run of `cfg` on `device` (and its mixed precision) before the model, sparsity
        and optimizer are built; what it writes besides checkpoints goes to `<run_dir>/<name>`. Nothing by default."""
        return None

    def autocast(self, device: torch.device, precision: str) -> AbstractContextManager:
        """The context every forward pass runs in: torch's bfloat16 autocast for bf16, none for fp32."""
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def grad_scaler(self, precision: str) -> Any:
        """A loss scaler (`scale`, `unscale_`, `step`, `update`, `state_dict`) where `precision` needs one; None."""
        return None

    def compile(self, model: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The callable the training step runs the model through; the model itself by default."""
        return model

    def batches(
        self, batches: Iterable[tuple[torch.Tensor, ...]], steps: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """The next `steps` batches (one per optimizer step) on `device`; the Cerebras backend drives a
        `DataExecutor`, which moves them itself."""
        for batch in itertools.islice(batches, steps):
            yield tuple(t.to(device, non_blocking=True) for t in batch)

    def wrap_step(
        self,
        step: Callable[..., tuple[torch.Tensor, ...]],
        end_step: Callable[..., None],
    ) -> Callable[..., None]:
        """One training step: run `step(batch)`, then `end_step(*its results)` (logging, evaluation, saving).

        The Cerebras backend traces `step` and hands its results to `end_step` through a step closure.
        """

        def run(*batch: torch.Tensor) -> None:
            end_step(*step(*batch))

        return run

    def sync_checkpoints(self, run_dir: Path, keep: int) -> None:
        """Before a resume looks for the run's newest checkpoint: turn checkpoints the backend wrote in a format of
        its own under `<run_dir>/<name>` into the run's checkpoint directories (keeping `keep`). Nothing by default."""
        return None

    def run(self, loop: LoopDriver) -> RunOutcome:
        """Drive `loop` (a backend may instead only lower a step for its hardware, and ask for more runs)."""
        loop.fit()
        return RunOutcome(trained=True)

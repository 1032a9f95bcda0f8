"""The training-backend protocol: how a training step runs, where its batches come from, what drives the loop.

A backend owns the runtime (`start`), the model's compiled form (`compile`), the sparsity plug-in and the
optimizer class, the step's execution (`wrap_step`, `batches`) and who drives the loop (`run`). It knows the loop
only through `LoopDriver`. Inference converters, which rewrite a loaded model, are apart
(`modelzoo.backends.converters`).
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

from modelzoo.cluster import ClusterConfig
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import SparsityStats
from modelzoo.train.config import OptimConfig
from modelzoo.train.optim import build_scheduler


@dataclass(frozen=True)
class Capabilities:
    """What a training backend supports; checked against the config before anything runs."""

    algorithms: frozenset[str]
    devices: frozenset[str]
    dtypes: frozenset[str]


class Sparsifier(Protocol):
    """The plug-in interface every backend's sparsity object offers to the loop."""

    def apply(self, model: nn.Module) -> None: ...
    def apply_optimizer(self, optimizer: torch.optim.Optimizer) -> None: ...
    def mask_names(self) -> list[str]: ...
    def stats(self) -> SparsityStats: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class LoopDriver(Protocol):
    """What a backend may call on the training loop (`modelzoo.train.loop.TrainLoop`)."""

    def fit(self) -> None:
        """Train to the last step: steps through `Backend.wrap_step` / `batches`, with logging, evaluation and
        checkpoints."""
        ...

    def sparse_names(self) -> list[str]:
        """The names of the parameters the sparsity plug-in masks."""
        ...


class Backend(ABC):
    """One way of running (sparse) training."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # Whether the host may read the model's weights between steps (not on a CS-2, where they live on the wafer
    # and come back only in checkpoints).
    weights_on_host: ClassVar[bool] = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, as one sentence with a fix; None when it can."""
        return None

    @classmethod
    def is_available(cls) -> bool:
        """Whether this backend's libraries import on this machine."""
        return cls.unavailable_reason() is None

    @classmethod
    def check_config(cls, sparsity: SparsityConfig) -> None:
        """Refuse, before any compute, config values this backend cannot honour (a `ConfigError`)."""
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

    def start(self, cluster: ClusterConfig, device: torch.device, artifact_dir: Path, precision: str = "fp32") -> None:
        """Set up the runtime (and its mixed precision) before the model, sparsity and optimizer are built;
        nothing by default."""
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

    def prepare_resume(self, artifact_dir: Path, run_dir: Path, keep: int) -> None:
        """Before `task.resume` looks for the run's newest checkpoint, from the backend's `artifact_dir`: nothing by
        default (the Cerebras backend converts the `cstorch.save` files its run wrote after that one)."""
        return None

    def run(self, loop: LoopDriver) -> bool:
        """Drive `loop`; True when it trained (the Cerebras backend may only lower a step for a CS-2)."""
        loop.fit()
        return True

    def lowering_left(self) -> list[str]:
        """After a `run` that only lowered: the programs (`cluster.programs`) left to lower in a new process."""
        return []

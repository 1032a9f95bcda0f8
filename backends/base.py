"""The backend protocol: where sparse GEMMs run, and what each backend can do."""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
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
    """What a backend supports; checked against the config before anything runs."""

    train: bool
    infer: bool
    algorithms: frozenset[str]
    devices: frozenset[str]
    dtypes: frozenset[str]


class Sparsifier(Protocol):
    """The plug-in interface every backend's sparsity object offers to the trainer."""

    def apply(self, model: nn.Module) -> None: ...
    def apply_optimizer(self, optimizer: torch.optim.Optimizer) -> None: ...
    def mask_names(self) -> list[str]: ...
    def stats(self) -> SparsityStats: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Backend(ABC):
    """One way of running (sparse) training and inference."""

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
    def check_config(cls, sparsity: SparsityConfig) -> None:
        """Refuse, before any compute, config values this backend cannot honour (a `ConfigError`)."""
        return None

    @abstractmethod
    def sparsifier(self, config: SparsityConfig, seed: int) -> Sparsifier:
        """The sparsity plug-in for `config` (only called when sparsity is enabled)."""

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        """The AdamW implementation the trainer builds (cstorch needs its own)."""
        return torch.optim.AdamW

    def scheduler(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> Any:
        """The learning-rate schedule of `cfg` over `max_steps`, stepped once per optimizer step: torch's
        `LambdaLR` of `lr_factor` by default (cstorch's own schedulers on the Cerebras backend)."""
        return build_scheduler(optimizer, cfg, max_steps)

    def start(
        self,
        cluster: ClusterConfig,
        device: torch.device,
        artifact_dir: Path,
        *,
        compile_only: bool = False,
        validate_only: bool = False,
    ) -> None:
        """Set up the runtime before the model, sparsity and optimizer are built; nothing by default.

        `compile_only` / `validate_only` (CS-2 only, refused earlier for other backends) stop after lowering.
        """
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

    def lower(self, run_step: Callable[[], None], sparse_names: list[str], cluster: ClusterConfig) -> Any:
        """compile_only / validate_only: only the Cerebras backend lowers programs (validation refuses the rest)."""
        raise NotImplementedError(f"backend {self.name!r} does not lower programs for a CS-2")

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

    def prepare_inference(self, model: nn.Module, tokens: int) -> nn.Module:
        """`model` made ready for forward-only calls of about `tokens` tokens each.

        The default leaves it as it is: a masked model's pruned weights are already exact zeros.
        """
        return model

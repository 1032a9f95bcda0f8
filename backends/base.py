"""The backend protocol: where sparse GEMMs run, and what each backend can do."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import SparsityStats


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
    def is_available(cls) -> bool:
        """Whether this backend's libraries import on this machine."""
        return True

    @abstractmethod
    def sparsifier(self, config: SparsityConfig, seed: int) -> Sparsifier:
        """The sparsity plug-in for `config` (only called when sparsity is enabled)."""

    def wrap_step(self, step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Wrap one training step (the Cerebras backend traces it); identity by default."""
        return step

    def prepare_inference(self, model: nn.Module, tokens: int) -> nn.Module:
        """`model` made ready for forward-only calls of about `tokens` tokens each.

        The default leaves it as it is: a masked model's pruned weights are already exact zeros.
        """
        return model

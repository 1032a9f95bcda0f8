"""Sparsity algorithms: how one group's masks start and how they change at mask-update steps.

Mirrors `cerebras.pytorch.sparse` {static,gmp,set,rigl}.py: `update_mask` computes a group member's new mask
from its weight, its current mask and the level the schedule gives at this step. The plug-in
(`modelzoo.sparsity.plugin`) decides when that happens and applies the result.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from modelzoo.sparsity.config import SparsityGroupConfig
from modelzoo.sparsity.distribution import distribute
from modelzoo.sparsity.init import init_mask
from modelzoo.sparsity.masks import drop_smallest, grow_largest, topk_mask
from modelzoo.sparsity.schedules import Schedule, make_schedule, make_update_schedule


class Algorithm:
    """One group's algorithm: its schedules, initial masks, update rule and state (cstorch `SparsityAlgorithm`)."""

    name: ClassVar[str]
    dynamic: ClassVar[bool] = False
    needs_dense_grad: ClassVar[bool] = False

    def __init__(self, config: SparsityGroupConfig, key: str) -> None:
        self.config = config
        self.sparsity: Schedule = make_schedule(config.sparsity_spec, f"{key}.sparsity")
        self.update_schedule = make_update_schedule(config.update, f"{key}.update") if self.dynamic else None
        # cstorch `DynamicSparsityAlgorithm`: if step 0 is no update step, training starts dense.
        self.starts_sparse = self.update_schedule is None or self.update_schedule(0)
        self.pattern = None if config.pattern is None else (config.pattern.n, config.pattern.m)

    def levels(self, step: int, shapes: list[tuple[int, ...]]) -> list[float]:
        """Per-tensor sparsity at `step`: the schedule's value clamped to [0, 1], spread by `distribution`."""
        level = min(max(self.sparsity(step), 0.0), 1.0)
        return distribute(level, shapes, self.config.distribution)

    def initial_mask(self, weight: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
        """The mask at step 0 (all True when a dynamic algorithm starts dense)."""
        if not self.starts_sparse:
            return torch.ones_like(weight, dtype=torch.bool)
        return init_mask(weight, level, self.config.init_method, generator, self.pattern)

    def start(self) -> None:
        """After the initial masks: cstorch counts them as the sparsity schedule's first update if sparse."""
        self.sparsity.advance(self.starts_sparse)

    def is_update_step(self, step: int) -> bool:
        return self.update_schedule is not None and self.update_schedule(step)

    def advance(self, is_update_step: bool) -> None:
        """Move step-counting schedules on, once per optimizer step after the masks were computed."""
        self.sparsity.advance(is_update_step)

    def update_mask(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor,
        level: float,
        step: int,
        generator: torch.Generator,
        dense_grad: torch.Tensor | None,
    ) -> torch.Tensor:
        """The new mask of one tensor at an update step (dynamic algorithms only)."""
        raise NotImplementedError(f"{self.name} masks do not change")

    def state_dict(self) -> dict:
        return {"algorithm": self.name, "sparsity": self.sparsity.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["algorithm"] != self.name:
            raise ValueError(f"sparsity state is for algorithm {state['algorithm']!r}, not {self.name!r}")
        self.sparsity.load_state_dict(state["sparsity"])


class Static(Algorithm):
    """Static sparsity (cstorch `Static`): the initial masks are kept for the whole run."""

    name = "static"


class GMP(Algorithm):
    """Gradual magnitude pruning (Zhu & Gupta 2017, arXiv 1710.01878): at each update keep the largest
    magnitudes at the scheduled level (cstorch `GMP`: top-k of |w| over the whole tensor).
    """

    name = "gmp"
    dynamic = True

    def update_mask(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor,
        level: float,
        step: int,
        generator: torch.Generator,
        dense_grad: torch.Tensor | None,
    ) -> torch.Tensor:
        return topk_mask(weight.abs(), level)


class SET(Algorithm):
    """Sparse Evolutionary Training (Mocanu et al. 2018, arXiv 1707.04780): drop `drop_fraction` of the
    connections with the smallest |w|, regrow as many at random among the pruned positions (cstorch `SET`).

    The random scores are `torch.rand(weight.shape, generator=generator)` on the generator's device, drawn
    for every tensor of the group in order at every update step.
    """

    name = "set"
    dynamic = True

    def __init__(self, config: SparsityGroupConfig, key: str) -> None:
        super().__init__(config, key)
        self.drop_fraction = make_schedule(config.drop_fraction_spec, f"{key}.drop_fraction", closed=True)

    def advance(self, is_update_step: bool) -> None:
        super().advance(is_update_step)
        self.drop_fraction.advance(is_update_step)

    def regrow_score(
        self, weight: torch.Tensor, generator: torch.Generator, dense_grad: torch.Tensor | None
    ) -> torch.Tensor:
        """Where to regrow: the highest scores among the pruned positions win."""
        return torch.rand(weight.shape, generator=generator, device=generator.device).to(weight.device)

    def update_mask(
        self,
        weight: torch.Tensor,
        mask: torch.Tensor,
        level: float,
        step: int,
        generator: torch.Generator,
        dense_grad: torch.Tensor | None,
    ) -> torch.Tensor:
        kept, nnz = drop_smallest(weight.abs(), mask, self.drop_fraction(step))
        return grow_largest(self.regrow_score(weight, generator, dense_grad), kept, level, nnz)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "drop_fraction": self.drop_fraction.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.drop_fraction.load_state_dict(state["drop_fraction"])


class RigL(SET):
    """Rigging the Lottery (Evci et al. 2020, arXiv 1911.11134): drop like SET, regrow where the dense
    (unmasked) gradient, accumulated over the step's micro-batches, is largest in magnitude (cstorch `RigL`).
    """

    name = "rigl"
    needs_dense_grad = True

    def regrow_score(
        self, weight: torch.Tensor, generator: torch.Generator, dense_grad: torch.Tensor | None
    ) -> torch.Tensor:
        if dense_grad is None:
            raise RuntimeError("RigL needs the dense gradient of every sparse weight at an update step")
        return dense_grad.abs()


ALGORITHM_CLASSES: dict[str, type[Algorithm]] = {cls.name: cls for cls in (Static, GMP, SET, RigL)}


def make_algorithm(config: SparsityGroupConfig, key: str) -> Algorithm:
    """The algorithm object for a validated group config (`key` names it in errors)."""
    return ALGORITHM_CLASSES[config.algorithm](config, key)

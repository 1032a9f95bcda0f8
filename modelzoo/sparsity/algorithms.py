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
        """Per-tensor sparsity at `step`: the schedule's value, spread over the tensors (`spread`)."""
        return self.spread(self.sparsity(step), shapes)

    def spread(self, level: float, shapes: list[tuple[int, ...]]) -> list[float]:
        """Per-tensor sparsity for the group level `level`: clamped to [0, 1] as cstorch clamps (config validation
        refuses schedules that leave [0, 1) within the run, `modelzoo.sparsity.plan.check_run`), then spread by
        `distribution`."""
        return distribute(min(max(level, 0.0), 1.0), shapes, self.config.distribution)

    def mask_draws(self, last_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """When this group's masks are set in a run up to step `last_step`, and at what scheduled level.

        Returns (steps, levels): the steps in [0, `last_step`] (int64, ascending) at which masks are drawn, step 0
        when the group starts sparse (the initial masks) and then its update steps from 1 on, assuming every
        update step's gradients are finite; and the schedule's raw float32 value at each (before clamping).
        """
        steps = torch.zeros(1, dtype=torch.int64) if self.starts_sparse else torch.zeros(0, dtype=torch.int64)
        if self.update_schedule is not None:
            updates = self.update_schedule.steps_until(last_step)
            steps = torch.cat([steps, updates[updates >= 1]])
        return steps, self.sparsity.along(steps)

    def held_levels(self, draws: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The sparsity each tensor's mask holds after each draw of `mask_draws`, from the per-tensor levels the
        schedule gives there (`targets`, draws x tensors): those levels themselves (masks are drawn at them)."""
        return targets

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

    def drop_fractions(self, last_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(update steps in [1, `last_step`], the drop fraction read at each), as `mask_draws` for the level."""
        steps = self.update_schedule.steps_until(last_step)
        steps = steps[steps >= 1]
        return steps, self.drop_fraction.along(steps)

    def held_levels(self, draws: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """An update drops `drop_fraction` of the connections and regrows only up to the level, so it never
        prunes more than it dropped: s = min(target, 1 - (1 - d) (1 - s_before)), from dense before the first
        draw (cstorch SET / RigL: from a dense start each update sheds d of the connections)."""
        fractions = self.drop_fraction.along(draws[draws >= 1]).double().tolist()
        held, before = targets.clone(), torch.zeros(targets.shape[1], dtype=targets.dtype)
        for i, step in enumerate(draws.tolist()):
            if step >= 1:  # step 0: the initial masks, drawn at the level
                held[i] = torch.minimum(targets[i], 1 - (1 - fractions.pop(0)) * (1 - before))
            before = held[i]
        return held

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

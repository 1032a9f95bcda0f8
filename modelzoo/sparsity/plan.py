"""Which parameters each sparsity group takes (the first group whose `param_filter` matches wins), and at what level.

Over a run of `steps` optimizer steps a group's masks are set at step 0 (when it starts sparse) and at its update
steps; training step k (0-based: k optimizer steps taken) runs with the masks of the last draw at or before k, and
dense before the first. `check_run` validates every level a run reaches; `run_levels` integrates them per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modelzoo.errors import ConfigError
from modelzoo.sparsity.algorithms import SET, make_algorithm
from modelzoo.sparsity.config import SparsityConfig, SparsityGroupConfig
from modelzoo.sparsity.distribution import distribute
from modelzoo.sparsity.masks import num_kept
from modelzoo.sparsity.names import select_parameters
from modelzoo.sparsity.schedules import make_schedule, make_update_schedule


@dataclass(frozen=True)
class GroupPlan:
    """One group's config, its config key (for messages) and the names of the parameters it sparsifies."""

    key: str
    config: SparsityGroupConfig
    names: tuple[str, ...]


def plan_groups(config: SparsityConfig, model: nn.Module) -> list[GroupPlan]:
    """Assign parameters to groups in order; a group that is left with no parameter is a `ConfigError`."""
    params = dict(model.named_parameters())
    taken: set[str] = set()
    plans = []
    for key, group in config.group_configs():
        names = [n for n in select_parameters(model, group.filters) if n not in taken]
        if not names:
            earlier = " that an earlier group has not taken" if taken else ""
            raise ConfigError(
                f"{key}.param_filter",
                f"{group.filters} selects no parameter{earlier}; names look like 'transformer.h.0.mlp.c_fc.weight' "
                "or, in Cerebras spelling, '*.ffn.ffn.0.linear_layer.weight'",
            )
        if group.pattern is not None:
            m = group.pattern.m
            for name in names:
                shape = tuple(params[name].shape)
                if len(shape) != 2 or shape[1] % m:
                    raise ConfigError(
                        f"{key}.pattern", f"{name} of shape {shape} has no input dimension divisible by m={m}"
                    )
        taken.update(names)
        plans.append(GroupPlan(key, group, tuple(names)))
    return plans


def target_levels(config: SparsityConfig, model: nn.Module) -> dict[str, float]:
    """Each sparse parameter's target sparsity (`SparsityGroupConfig.final_level`, spread by `distribution`)."""
    params = dict(model.named_parameters())
    levels: dict[str, float] = {}
    for plan in plan_groups(config, model):
        shapes = [tuple(params[n].shape) for n in plan.names]
        spread = distribute(plan.config.final_level(), shapes, plan.config.distribution)
        levels.update(zip(plan.names, spread, strict=True))
    return levels


def check_run(config: SparsityConfig, model: nn.Module, steps: int) -> None:
    """Refuse, at config time, a run of `steps` optimizer steps in which some group's masks would be drawn at a
    level outside [0, 1), at a level that keeps no weight of some tensor, or with a drop fraction outside [0, 1].

    The `ConfigError` names the group's key and the first offending step. Mask draws at steps 0..`steps` count
    (the update after the last optimizer step sets the masks the run ends with).
    """
    params = dict(model.named_parameters())
    for plan in plan_groups(config, model):
        algorithm = make_algorithm(plan.config, plan.key)
        draws, levels = algorithm.mask_draws(steps)
        _check_range(f"{plan.key}.sparsity", draws, levels, "[0, 1)", lambda x: 0.0 <= x < 1.0, steps)
        if isinstance(algorithm, SET):  # SET and RigL drop a fraction of the connections at each update
            updates, fractions = algorithm.drop_fractions(steps)
            _check_range(f"{plan.key}.drop_fraction", updates, fractions, "[0, 1]", lambda x: 0.0 <= x <= 1.0, steps)
        if not len(levels):
            continue
        # Every tensor's level grows with the group's (uniform and ERK alike): the fullest draw keeps the fewest.
        fullest = int(torch.argmax(levels))
        level, step = float(levels[fullest]), int(draws[fullest])
        shapes = [tuple(params[n].shape) for n in plan.names]
        for name, tensor_level in zip(plan.names, algorithm.spread(level, shapes), strict=True):
            numel = params[name].numel()
            if num_kept(numel, tensor_level) == 0:
                raise ConfigError(
                    f"{plan.key}.sparsity",
                    f"{level:.6g} at step {step} keeps no weight of {name} ({numel:,} entries, "
                    f"{plan.config.distribution} level {tensor_level:.6g}): (1 - level) x {numel:,} must be at least 1",
                )


def never_updated(config: SparsityConfig, steps: int) -> list[str]:
    """A warning for each dynamic group (GMP, SET, RigL) whose first mask update after step 0 falls after the run's
    `steps` optimizer steps: its masks never change, so the run trains static sparsity (or stays dense, when step 0
    is no update step either). Each names the group's `update` key, the first update and what would reach it."""
    warnings = []
    for key, group in config.group_configs():
        if not (group.enabled and group.dynamic):
            continue
        schedule = make_update_schedule(group.update, f"{key}.update")
        if (schedule.steps_until(steps) >= 1).any():
            continue
        later = schedule.steps_until(schedule.last_step)
        later = later[later >= 1]
        when = f"at step {int(later[0])}" if len(later) else "never after step 0"
        start = make_schedule(group.sparsity_spec, f"{key}.sparsity")(0) if schedule(0) else 0.0
        effect = f"its step-0 masks ({start:.0%} sparse) never change" if start > 0 else "it trains dense"
        fix = f" or set task.max_steps to at least {int(later[0])}" if len(later) else ""
        warnings.append(
            f"{key}.update: {group.algorithm}'s first mask update comes {when}, not within the run's {steps} steps "
            f"(task.max_steps), so {effect}; schedule one within steps 1-{steps} ({key}.update.freq, .start or "
            f".steps){fix}"
        )
    return warnings


def _check_range(key: str, steps: torch.Tensor, values: torch.Tensor, allowed: str, ok, run_steps: int) -> None:
    for step, value in zip(steps.tolist(), values.tolist(), strict=True):
        if not ok(value):
            raise ConfigError(
                key,
                f"reaches {value:.6g} at step {step}, outside {allowed}; every mask update of the run's {run_steps} "
                "steps (task.max_steps) must stay inside it: shorten the schedule (update.stop) or change its "
                "arguments",
            )


@dataclass(frozen=True)
class RunLevels:
    """Per sparse tensor: `average`, the mean over the run's training steps of the sparsity its masks hold;
    `final`, the sparsity of the masks the run ends with; `dense_grad`, the mean over the steps of the sparsity
    that computing the dense weight gradient fills in (RigL, on each step that precedes a mask update)."""

    average: dict[str, float]
    final: dict[str, float]
    dense_grad: dict[str, float]


def run_levels(config: SparsityConfig, model: nn.Module, steps: int | None) -> RunLevels:
    """The levels of a run of `steps` optimizer steps, assuming every update step's gradients are finite;
    `steps=None`: the target masks (`SparsityGroupConfig.final_level`) held from the first step, as a fine-tuning
    run holds them."""
    if steps is None:
        target = target_levels(config, model)
        return RunLevels(target, target, {})
    params = dict(model.named_parameters())
    average, final, dense_grad = {}, {}, {}
    for plan in plan_groups(config, model):
        algorithm = make_algorithm(plan.config, plan.key)
        shapes = [tuple(params[n].shape) for n in plan.names]
        draws, levels = algorithm.mask_draws(steps)
        # (draws + 1) x tensors: what each tensor's mask holds before any draw (dense) and after each draw
        unique, inverse = torch.unique(levels, return_inverse=True)
        spread = torch.tensor([algorithm.spread(x, shapes) for x in unique.tolist()], dtype=torch.float64)
        held = algorithm.held_levels(draws, spread.reshape(-1, len(shapes))[inverse])
        held = torch.cat([torch.zeros(1, len(shapes), dtype=torch.float64), held])
        # Training step k runs with the masks of the last draw at or before it: row searchsorted(draws, k).
        during = torch.searchsorted(draws, torch.arange(steps), right=True)
        average.update(zip(plan.names, _mean_over_steps(held, during, steps), strict=True))
        final.update(zip(plan.names, held[-1].tolist(), strict=True))
        if algorithm.needs_dense_grad:
            # The step before each update (step u - 1) computes the dense weight gradient, at the masks it runs with.
            before = during[draws[draws >= 1] - 1]
            dense_grad.update(zip(plan.names, _mean_over_steps(held, before, steps), strict=True))
    return RunLevels(average, final, dense_grad)


def _mean_over_steps(held: torch.Tensor, rows: torch.Tensor, steps: int) -> list[float]:
    """Per tensor (column of `held`): the sum of `held[rows]` over the listed steps' rows, divided by `steps`."""
    counts = torch.bincount(rows, minlength=len(held)).to(held.dtype)
    return (counts @ held / max(steps, 1)).tolist()

"""Which parameters each sparsity group takes (the first group whose `param_filter` matches wins), and at what level."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from modelzoo.errors import ConfigError
from modelzoo.sparsity.config import SparsityConfig, SparsityGroupConfig
from modelzoo.sparsity.distribution import distribute
from modelzoo.sparsity.names import select_parameters


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

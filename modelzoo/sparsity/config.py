"""Sparsity config with Cerebras Model Zoo keys, so a recipe's `sparsity:` block ports by copy.

One block (the keys at top level) configures one group of parameters; several groups go in `groups`, a list
of blocks of which the first whose `param_filter` matches a parameter wins (Cerebras' own config class keeps
a `groups: List[SparsityAlgorithmConfig]` internally, and `cstorch.sparse.configure` takes a list of dicts):

    sparsity: 0.75                                   # one group, Cerebras keys
    algorithm: rigl
    drop_fraction: {type: cosine, init: 0.3, half_period: 3584}
    update: {freq: 100, stop: 3584}

    groups:                                          # several groups
      - {param_filter: '*attn.*.weight', sparsity: 0.5}
      - {param_filter: '*mlp.*.weight', sparsity: 0.75, distribution: erk}

Beyond Cerebras' keys: `distribution` (`uniform` | `erk`) and `pattern` (`{n: 2, m: 4}`: N:M structured masks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from modelzoo.errors import ConfigError
from modelzoo.sparsity.distribution import DISTRIBUTIONS
from modelzoo.sparsity.init import INIT_METHODS
from modelzoo.sparsity.names import as_globs
from modelzoo.sparsity.schedules import Constant, make_schedule, make_update_schedule

ALGORITHMS = ("static", "gmp", "set", "rigl")
DYNAMIC_ALGORITHMS = ("gmp", "set", "rigl")
DROP_ALGORITHMS = ("set", "rigl")
NM_INIT_METHODS = ("random", "topk")
DEFAULT_DROP_FRACTION = 0.3  # cstorch SET and RigL


@dataclass
class NMPattern:
    """N:M structured sparsity: `n` of every `m` consecutive input weights are kept (so sparsity 1 - n/m)."""

    n: int = 2
    m: int = 4

    @property
    def sparsity(self) -> float:
        """The fraction of zeros the pattern implies, 1 - n/m."""
        return 1.0 - self.n / self.m

    def check(self, key: str, sparsity_key: str, sparsity: Any) -> None:
        """Refuse a pattern that is not integers 0 < n < m (naming `key`), or a `sparsity` given beside it that
        contradicts 1 - n/m (naming `sparsity_key`); the one check of an N:M target (training and pruning)."""
        n, m = self.n, self.m
        if not (all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) and 0 < n < m):
            raise ConfigError(
                key, f"N:M keeps n of every m weights and needs integers 0 < n < m, got n={n}, m={m} (e.g. 2:4)"
            )
        if sparsity is not None and not (isinstance(sparsity, (int, float)) and math.isclose(sparsity, self.sparsity)):
            raise ConfigError(
                sparsity_key, f"{sparsity!r} contradicts pattern {n}:{m} (sparsity 1 - n/m = {self.sparsity})"
            )


@dataclass
class SparsityGroupConfig:
    """One group: which parameters (`param_filter`), how sparse (`sparsity`) and how masks evolve (`algorithm`).

    `sparsity` is the fraction of zeros: a number, or for dynamic algorithms a schedule (see
    `modelzoo.sparsity.schedules`). `param_filter` is an fnmatch glob or a list of globs matched against our
    parameter names and their Cerebras Model Zoo equivalents; absent, Cerebras' default applies (every >1-D
    weight that is not an embedding, a norm or the LM head). `update` and `drop_fraction` apply to dynamic
    algorithms only; `drop_fraction` defaults to cstorch's 0.3.
    """

    sparsity: Any = None
    init_method: str = "random"
    algorithm: str = "static"
    param_filter: Any = None
    update: Any = None
    drop_fraction: Any = None
    distribution: str = "uniform"
    pattern: NMPattern | None = None

    @property
    def filters(self) -> list[str] | None:
        return as_globs(self.param_filter)

    @property
    def dynamic(self) -> bool:
        return self.algorithm in DYNAMIC_ALGORITHMS

    @property
    def sparsity_spec(self) -> Any:
        """The sparsity value or schedule; an N:M pattern implies 1 - n/m."""
        if self.pattern is not None and self.sparsity is None:
            return self.pattern.sparsity
        return self.sparsity

    @property
    def drop_fraction_spec(self) -> Any:
        return DEFAULT_DROP_FRACTION if self.drop_fraction is None else self.drop_fraction

    @property
    def enabled(self) -> bool:
        spec = self.sparsity_spec
        return spec is not None and not (isinstance(spec, (int, float)) and float(spec) == 0.0)

    def final_level(self) -> float:
        """The target level: the constant, or a schedule's value at the last mask update (`update.stop`, the
        last of `update.steps`, or step 100,000 as Cerebras' compiler annotation assumes), clamped to [0, 1].
        """
        spec = self.sparsity_spec
        if isinstance(spec, (int, float)):
            return float(spec)
        schedule = make_schedule(spec, "sparsity")
        last = make_update_schedule(self.update, "update").last_step if self.dynamic else 0
        return min(max(schedule.final(last), 0.0), 1.0)

    def validate(self, prefix: str) -> None:
        """Check every key of this group; errors name `prefix.<key>` and what is allowed."""
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"{prefix}.algorithm", f"unknown {self.algorithm!r}", ALGORITHMS)
        if self.init_method not in INIT_METHODS:
            raise ConfigError(f"{prefix}.init_method", f"unknown {self.init_method!r}", INIT_METHODS)
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"{prefix}.distribution", f"unknown {self.distribution!r}", DISTRIBUTIONS)
        filters = self.filters
        if filters is not None and (not filters or not all(isinstance(f, str) and f for f in filters)):
            raise ConfigError(f"{prefix}.param_filter", f"must be a glob or a non-empty list of globs, got {filters!r}")
        if self.pattern is not None:
            self._validate_pattern(prefix)
        self._validate_sparsity(prefix)
        if self.dynamic:
            make_update_schedule(self.update, f"{prefix}.update")
        elif self.update is not None:
            raise ConfigError(f"{prefix}.update", "static masks never update; remove it", DYNAMIC_ALGORITHMS)
        if self.algorithm in DROP_ALGORITHMS:
            make_schedule(self.drop_fraction_spec, f"{prefix}.drop_fraction", closed=True)
        elif self.drop_fraction is not None:
            raise ConfigError(
                f"{prefix}.drop_fraction", f"algorithm {self.algorithm!r} drops no connections", DROP_ALGORITHMS
            )

    def _validate_sparsity(self, prefix: str) -> None:
        key, spec = f"{prefix}.sparsity", self.sparsity_spec
        if spec is None:
            return
        if isinstance(spec, bool) or not isinstance(spec, (int, float)):
            if self.algorithm == "static":
                raise ConfigError(
                    key,
                    f"static sparsity must be a number in [0, 1), got {spec!r}; a schedule needs algorithm",
                    DYNAMIC_ALGORITHMS,
                )
            schedule = make_schedule(spec, key)
            if self.algorithm == "gmp" and isinstance(schedule, Constant):
                raise ConfigError(key, "gmp needs a schedule; for a constant level use algorithm", ["static"])
            return
        if self.algorithm == "gmp":
            raise ConfigError(
                key, f"gmp prunes along a schedule, got the constant {spec}; for a constant level use", ["static"]
            )
        make_schedule(spec, key)

    def _validate_pattern(self, prefix: str) -> None:
        self.pattern.check(f"{prefix}.pattern", f"{prefix}.sparsity", self.sparsity)
        if self.algorithm != "static":
            raise ConfigError(f"{prefix}.algorithm", f"N:M masks are static, got {self.algorithm!r}", ["static"])
        if self.init_method not in NM_INIT_METHODS:
            raise ConfigError(f"{prefix}.init_method", f"unknown for N:M {self.init_method!r}", NM_INIT_METHODS)
        if self.distribution != "uniform":
            raise ConfigError(f"{prefix}.distribution", "N:M sets every tensor's level", ["uniform"])


@dataclass
class SparsityConfig(SparsityGroupConfig):
    """The `sparsity` node: one group given by the keys at top level, or several in `groups`.

    With `groups`, the top-level keys keep their defaults; each group is a full block of its own, and a
    parameter belongs to the first group whose `param_filter` matches it.
    """

    groups: list[SparsityGroupConfig] | None = None

    def group_configs(self) -> list[tuple[str, SparsityGroupConfig]]:
        """(config key, group) pairs: `("sparsity", self)` for one block, else `("sparsity.groups[i]", group)`."""
        if self.groups is None:
            return [("sparsity", self)]
        return [(f"sparsity.groups[{i}]", g) for i, g in enumerate(self.groups)]

    @property
    def enabled(self) -> bool:
        return any(g.enabled for _, g in self.group_configs()) if self.groups is not None else super().enabled

    @property
    def algorithms(self) -> list[str]:
        """The algorithms of the enabled groups, each once, in group order."""
        return list(dict.fromkeys(g.algorithm for _, g in self.group_configs() if g.enabled))

    def validate(self, prefix: str = "sparsity") -> None:
        if self.groups is None:
            super().validate(prefix)
            return
        if not self.groups:
            raise ConfigError(f"{prefix}.groups", "is empty; give at least one group or remove the key")
        for f in fields(SparsityGroupConfig):
            if getattr(self, f.name) != f.default:
                raise ConfigError(
                    f"{prefix}.{f.name}", f"set it in each of {prefix}.groups[i]: top-level keys are unused with groups"
                )
        for key, group in self.group_configs():
            if group.sparsity_spec is None:
                raise ConfigError(f"{key}.sparsity", "missing: give a level in [0, 1), a schedule or a pattern")
            group.validate(key)

    def summary(self) -> dict:
        """What `sparsity.json` and run summaries record: algorithm, target level and pattern of each group."""
        groups = [
            {
                "algorithm": g.algorithm,
                "target_sparsity": g.final_level(),
                "pattern": "unstructured" if g.pattern is None else f"{g.pattern.n}:{g.pattern.m}",
                **({"param_filter": g.filters} if self.groups is not None else {}),
            }
            for _, g in self.group_configs()
            if g.enabled
        ]
        if self.groups is None:
            return groups[0]
        patterns = {g["pattern"] for g in groups}
        return {"pattern": patterns.pop() if len(patterns) == 1 else "mixed", "groups": groups}

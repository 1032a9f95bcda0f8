"""Sparsity config with Cerebras Model Zoo keys, so a recipe's `sparsity:` block ports by copy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelzoo.errors import ConfigError

INIT_METHODS = ("random", "topk")
ALGORITHMS = ("static",)


@dataclass
class SparsityConfig:
    """`sparsity` is the fraction of zeros (None: dense). Keys and defaults follow `cstorch.sparse.configure`.

    `param_filter` is an fnmatch glob or a list of globs matched against our parameter names and their
    Cerebras Model Zoo equivalents; absent, Cerebras' default applies (every >1-D weight that is not an
    embedding, a norm or the LM head).
    """

    sparsity: Any = None
    init_method: str = "random"
    algorithm: str = "static"
    param_filter: Any = None

    @property
    def enabled(self) -> bool:
        return self.sparsity is not None and float(self.sparsity) > 0.0

    @property
    def filters(self) -> list[str] | None:
        if self.param_filter is None:
            return None
        return [self.param_filter] if isinstance(self.param_filter, str) else list(self.param_filter)

    def validate(self, prefix: str = "sparsity") -> None:
        if self.sparsity is not None:
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
                raise ConfigError(f"{prefix}.sparsity", f"must be a number in [0, 1), got {self.sparsity!r}")
            if not 0.0 <= float(self.sparsity) < 1.0:
                raise ConfigError(f"{prefix}.sparsity", f"{self.sparsity} is outside [0, 1)")
        if self.init_method not in INIT_METHODS:
            raise ConfigError(f"{prefix}.init_method", f"unknown {self.init_method!r}", INIT_METHODS)
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"{prefix}.algorithm", f"unknown {self.algorithm!r}", ALGORITHMS)
        filters = self.filters
        if filters is not None and (not filters or not all(isinstance(f, str) and f for f in filters)):
            raise ConfigError(f"{prefix}.param_filter", f"must be a glob or a non-empty list of globs, got {filters!r}")

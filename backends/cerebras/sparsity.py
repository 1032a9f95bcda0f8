"""Our `sparsity` node as a `cstorch.sparse.Group`: the same parameters, initial masks and algorithms as masked_dense.

Each group's `param_filter` is resolved by our name matching (which also understands Cerebras Model Zoo names)
into the exact parameter names, and the initial masks are the ones masked_dense draws from the same seed (passed
as cstorch's `init_method` callable), so both backends start from identical masks; cstorch's own algorithms then
update them.

Two cstorch 2.10 bugs are worked around here (both verified on its CPU backend, `CEREBRAS_APPLIANCE.md` section 4):
- on CPU / GPU, SET's and RigL's drop fraction is cached under the step tensor, which is updated in place, so the
  value of the first step of the process is reused for every update: the cache is cleared before every step;
- `load_state_dict` empties a cycling (list-valued) sparsity schedule's saved position before reading it: it is
  restored by hand.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from modelzoo.backends.cerebras.environment import CSTORCH_VERSION, import_cstorch, unavailable_reason
from modelzoo.errors import ConfigError
from modelzoo.sparsity.config import DROP_ALGORITHMS, SparsityConfig, SparsityGroupConfig
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.sparsity.plan import plan_groups
from modelzoo.sparsity.plugin import MaskedSparsity, SparsityStats, sparsity_stats

# Our algorithm names -> the cstorch.sparse classes that implement them.
CSTORCH_ALGORITHMS = {"static": "Static", "gmp": "GMP", "set": "SET", "rigl": "RigL"}


def check_algorithms(sparsity: SparsityConfig, version: str, available: set[str]) -> None:
    """Refuse a group whose algorithm has no class among `available` in cerebras-pytorch `version`."""
    for key, group in sparsity.group_configs():
        name = CSTORCH_ALGORITHMS[group.algorithm]
        if group.enabled and name not in available:
            raise ConfigError(
                f"{key}.algorithm",
                f"cerebras-pytorch {version} has no {name}: install {CSTORCH_VERSION} "
                "(bash scripts/make_cerebras_venv.sh VENV) or choose one it has",
                [a for a, c in CSTORCH_ALGORITHMS.items() if c in available],
            )


def check_sparsity(sparsity: SparsityConfig) -> None:
    """Refuse what cstorch cannot run: N:M patterns, ERK, an algorithm the installed version lacks."""
    if not sparsity.enabled:
        return
    for key, group in sparsity.group_configs():
        if group.pattern is not None:
            raise ConfigError(
                f"{key}.pattern",
                "cstorch has no N:M algorithm: drop the pattern, or train N:M with backend=masked_dense",
            )
        if group.distribution != "uniform":
            raise ConfigError(
                f"{key}.distribution",
                f"{group.distribution!r} is not a cstorch distribution: set {key}.distribution=uniform, "
                "or train it with backend=masked_dense",
            )
    if unavailable_reason() is not None:  # `check_supports` refuses the backend next, saying why
        return
    cstorch = import_cstorch()
    available = {name for name in CSTORCH_ALGORITHMS.values() if hasattr(cstorch.sparse, name)}
    check_algorithms(sparsity, cstorch.__version__, available)


def _plain(value: Any) -> Any:
    """A schedule or update spec as cstorch reads it: numbers, lists and dicts (copied, never shared)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _init_method(masks: dict[int, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A cstorch `init_method` that returns the precomputed mask of each parameter (looked up by identity)."""

    def init_method(p, sparsity, score_shaper=None, device=None):
        return masks[id(p)].to(device or p.device)

    # cstorch checks the callable's annotations against its `InitMethodCallable` hint, so use exactly those.
    cstorch = import_cstorch()
    arg_types, return_type = typing.get_args(cstorch.sparse.init.InitMethodCallable)
    names = ("p", "sparsity", "score_shaper", "device")
    init_method.__annotations__ = {**dict(zip(names, arg_types, strict=True)), "return": return_type}
    return init_method


def group_spec(group: SparsityGroupConfig, names: Iterable[str], init_method: Any) -> dict[str, Any]:
    """One `cstorch.sparse.configure` dict for a group of ours, selecting exactly `names`."""
    spec: dict[str, Any] = {
        "algorithm": group.algorithm,
        "sparsity": _plain(group.sparsity_spec),
        "init_method": init_method,
        "param_filter": list(names),
    }
    if group.dynamic and group.update is not None:
        spec["update"] = _plain(group.update)
    if group.algorithm in DROP_ALGORITHMS:
        spec["drop_fraction"] = _plain(group.drop_fraction_spec)
    return spec


class CerebrasSparsity:
    """The sparsity plug-in on cstorch: a `cstorch.sparse.Group` built from our `sparsity` node."""

    def __init__(self, config: SparsityConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.group: Any = None
        self.names: list[str] = []
        self._model: nn.Module | None = None
        # Each sparse weight's level as cstorch's computed-sparsity hook reported it in the latest (traced)
        # optimizer step: a tensor for a dynamic algorithm, the configured float for a static one.
        self.levels: dict[str, torch.Tensor | float] = {}

    def apply(self, model: nn.Module) -> None:
        """Configure cstorch's algorithms for the parameters each group selects and attach them.

        `model` must have been through `cstorch.compile` (the backend's `compile`), which makes
        `model.apply(sparsity)` cstorch's.
        """
        cstorch = import_cstorch()
        plans = plan_groups(self.config, model)
        by_name = MaskedSparsity(self.config, self.seed).initial_masks(model)
        params = dict(model.named_parameters())
        init = _init_method({id(params[n]): mask for n, mask in by_name.items()})
        self.group = cstorch.sparse.configure([group_spec(p.config, p.names, init) for p in plans])
        model.apply(self.group)
        self.group.register_computed_sparsity_hook(self._record_level)
        self.names = [n for n in params if n in by_name]
        self._model = model

    def _record_level(self, algorithm: Any, name: str, level: torch.Tensor | float) -> None:
        """cstorch's computed-sparsity hook, fired inside the optimizer step (so inside the traced program): the
        level of the mask it computed for `name`; a static algorithm reports `*` for all of its weights."""
        for param in algorithm.sparse_params if name == "*" else (name,):
            self.levels[param] = level

    def apply_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer.apply(sparsity)`, then on CPU / GPU the masks are initialised at once (cstorch leaves them
        all-True until a `DataExecutor` starts), so that they can be inspected, saved or loaded before training.
        On CSX the masks are initialised as part of the traced program."""
        optimizer.apply(self.group)
        if not import_cstorch().use_cs():
            self.group.initialize()
            optimizer.register_step_pre_hook(self._clear_drop_fraction_cache)

    def _algorithms(self) -> list[Any]:
        return [group.algorithm for group in self.group._groups]

    def _clear_drop_fraction_cache(self, *hook_args: Any) -> None:
        """Before each optimizer step: the drop fraction is computed anew from this step's counter."""
        for algorithm in self._algorithms():
            if hasattr(algorithm, "drop_fraction"):
                algorithm.drop_fraction.cache_clear()

    def mask_names(self) -> list[str]:
        return [n + MASK_SUFFIX for n in self.names]

    def stats(self) -> SparsityStats:
        # cstorch keeps each mask as the buffer `<param>_mask` of the parameter's module, and may replace it.
        model = self._model
        return sparsity_stats([(n, model.get_parameter(n), model.get_buffer(n + MASK_SUFFIX)) for n in self.names])

    def state_dict(self) -> list[dict]:
        return self.group.state_dict()

    def load_state_dict(self, state: list[dict]) -> None:
        """cstorch's load (which pops from the dicts it gets, so it is handed a copy), then each cycling
        schedule's saved position, which cstorch's load drops."""
        self.group.load_state_dict(copy.deepcopy(state))
        for saved, algorithm in zip(state, self._algorithms(), strict=True):
            for name, schedule_state in saved.get("sparsity", {}).items():
                param = algorithm.sparse_params[name].param
                algorithm.sparsity[param].load_state_dict(copy.deepcopy(dict(schedule_state)))

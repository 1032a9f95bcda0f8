"""Masked-dense sparsity with Cerebras semantics, applied to a model and its optimizer from outside.

What `cerebras.pytorch.sparse` does, emulated on any device:
- every sparse parameter gets a persistent bool buffer `<param>_mask` (so masks are in `state_dict`);
- pruned weights are kept at exact zero in place (no mask multiply in the forward pass);
- gradients are zeroed at pruned positions by a gradient hook, before clipping and accumulation;
- optimizer state tensors of the parameter's shape are masked before each step, and the weights are
  re-pruned after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from modelzoo.errors import ConfigError
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.init import init_mask
from modelzoo.sparsity.names import select_parameters

MASK_SUFFIX = "_mask"


@dataclass
class SparseParam:
    name: str
    module: nn.Module
    leaf: str
    _multiplier: torch.Tensor | None = field(default=None, repr=False)
    _multiplier_key: tuple | None = field(default=None, repr=False)

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.leaf)

    @property
    def mask(self) -> torch.Tensor:
        # Looked up each time: `model.to(device)` and `load_state_dict` may replace or refill the buffer.
        return getattr(self.module, self.leaf + MASK_SUFFIX)

    def multiplier(self) -> torch.Tensor:
        """The mask as 0/1 in the parameter's dtype, rebuilt whenever the mask tensor changes.

        Multiplying by it is several times faster on CPU than by the bool mask (which converts on every
        use); the bool buffer stays the checkpointed truth. `_version` counts in-place writes such as
        `load_state_dict`'s copy.
        """
        mask, param = self.mask, self.param
        key = (mask.data_ptr(), mask._version, param.dtype, param.device)
        if key != self._multiplier_key:
            self._multiplier, self._multiplier_key = mask.to(param.dtype), key
        return self._multiplier


@dataclass
class SparsityStats:
    per_param: dict[str, float]
    sparse_zeros: int
    sparse_numel: int

    @property
    def global_sparsity(self) -> float:
        """Fraction of zeros over all targeted weights."""
        return self.sparse_zeros / max(self.sparse_numel, 1)


class MaskedSparsity:
    """Attaches static masks to the parameters selected by `config.param_filter`."""

    def __init__(self, config: SparsityConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.params: list[SparseParam] = []

    def apply(self, model: nn.Module) -> None:
        """Create masks (deterministic in `seed`), zero the pruned weights and register gradient hooks."""
        names = select_parameters(model, self.config.filters)
        if not names:
            raise ConfigError("sparsity.param_filter", f"{self.config.filters} selects no parameter of the model")
        generator = torch.Generator().manual_seed(self.seed)
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            weight = getattr(module, leaf)
            mask = init_mask(weight, float(self.config.sparsity), self.config.init_method, generator)
            module.register_buffer(leaf + MASK_SUFFIX, mask, persistent=True)
            sp = SparseParam(name, module, leaf)
            with torch.no_grad():
                weight.mul_(mask)
            weight.register_hook(lambda grad, sp=sp: grad * sp.multiplier())
            self.params.append(sp)

    def apply_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Mask optimizer state before each step and re-prune the weights after it."""
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._prune_state(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.prune_weights())

    @torch.no_grad()
    def prune_weights(self) -> None:
        torch._foreach_mul_([sp.param for sp in self.params], [sp.multiplier() for sp in self.params])

    @torch.no_grad()
    def _prune_state(self, optimizer: torch.optim.Optimizer) -> None:
        states, multipliers = [], []
        for sp in self.params:
            for value in optimizer.state.get(sp.param, {}).values():
                if torch.is_tensor(value) and value.shape == sp.param.shape:
                    states.append(value)
                    multipliers.append(sp.multiplier().to(value.dtype))
        if states:
            torch._foreach_mul_(states, multipliers)

    @torch.no_grad()
    def stats(self) -> SparsityStats:
        """Achieved sparsity: fraction of exact zeros in each targeted weight and over all of them."""
        per_param, zeros, numel = {}, 0, 0
        for sp in self.params:
            z = int((sp.param == 0).sum())
            per_param[sp.name] = z / sp.param.numel()
            zeros, numel = zeros + z, numel + sp.param.numel()
        return SparsityStats(per_param, zeros, numel)

    def mask_names(self) -> list[str]:
        """State-dict keys of the masks."""
        return [sp.name + MASK_SUFFIX for sp in self.params]

    def state_dict(self) -> dict:
        return {"algorithm": self.config.algorithm, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("algorithm") != self.config.algorithm:
            raise ValueError(
                f"sparsity state is for algorithm {state.get('algorithm')!r}, not {self.config.algorithm!r}"
            )

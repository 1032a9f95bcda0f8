"""Masked-dense emulation: dense GEMMs with pruned weights held at exact zero (reference semantics)."""

from __future__ import annotations

from modelzoo.backends.base import Backend, Capabilities
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity


class MaskedDenseBackend(Backend):
    name = "masked_dense"
    capabilities = Capabilities(
        algorithms=frozenset({"static", "gmp", "set", "rigl"}),
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({"fp32", "bf16"}),
    )

    def sparsifier(self, config: SparsityConfig, seed: int) -> MaskedSparsity:
        return MaskedSparsity(config, seed)

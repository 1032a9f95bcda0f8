"""How a group's sparsity level is spread over its tensors: `uniform` or `erk`.

`uniform` gives every tensor the group's level (Cerebras' only behaviour). `erk` is the Erdős–Rényi-Kernel
distribution of Evci et al. 2020 (RigL, arXiv 1911.11134, section 3 and their `sparse_utils.get_sparsities`):
a tensor's density is proportional to `sum(shape) / prod(shape)`, so small and narrow layers stay denser, scaled
so that the group as a whole keeps its level; a tensor whose density would exceed 1 is made dense and the
scale is solved again over the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DISTRIBUTIONS = ("uniform", "erk")


def distribute(level: float, shapes: Sequence[Sequence[int]], distribution: str) -> list[float]:
    """Per-tensor sparsity levels whose parameter-weighted mean is `level`."""
    if distribution == "uniform":
        return [level] * len(shapes)
    if distribution != "erk":
        raise ValueError(f"unknown distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, numels, strict=True)]
    dense: set[int] = set()
    while True:
        sparse = [i for i in range(len(shapes)) if i not in dense]
        # Nonzeros the sparse tensors must hold: the group's budget minus what the dense ones take.
        budget = (1.0 - level) * sum(numels) - sum(numels[i] for i in dense)
        divisor = sum(raw[i] * numels[i] for i in sparse)
        if not sparse or budget <= 0:
            break
        scale = budget / divisor
        too_dense = [i for i in sparse if raw[i] * scale > 1.0]
        if not too_dense:
            return [0.0 if i in dense else 1.0 - raw[i] * scale for i in range(len(shapes))]
        dense.update(too_dense)
    return [0.0 if i in dense else 1.0 for i in range(len(shapes))]

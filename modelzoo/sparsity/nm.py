"""N:M structured masks: `n` of every `m` consecutive input weights are kept (Mishra et al. 2021, arXiv 2104.08378).

For an `nn.Linear` weight `(out, in)` the groups of `m` run along dim 1, the input dimension: each output row is
cut into `in / m` runs of `m` neighbours and each run keeps its `n` highest-scoring entries. That is the layout of
NVIDIA's sparse tensor cores and of `torch.sparse.to_sparse_semi_structured` (2:4).
"""

from __future__ import annotations

import torch


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the `n` largest scores in every run of `m` consecutive entries along dim 1."""
    rows, cols = score.shape
    groups = score.float().reshape(rows, cols // m, m)  # (out, in/m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(groups, n, dim=-1, sorted=False).indices, True)
    return keep.reshape(rows, cols)

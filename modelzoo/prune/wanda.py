"""Wanda: pruning by weights and activations (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
Language Models", arXiv 2306.11695).

The score of weight W_ij (out, in) is |W_ij| x ||X_j||₂, the norm of input feature j over all calibration tokens.
Scores are compared within each output row (the paper's per-output comparison group); with N:M, within every run
of m input weights of a row. No weight is updated.
"""

from __future__ import annotations

import torch

from modelzoo.sparsity.masks import num_kept
from modelzoo.sparsity.nm import nm_mask


def wanda_mask(
    weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None
) -> torch.Tensor:
    """Bool mask (True = kept) of `weight` (out, in) given ||X_j||₂ per input feature (in,).

    Unstructured, the layer loses as many weights as SparseGPT and magnitude pruning remove at `sparsity`, so the
    methods compare at equal sparsity: every row prunes its `pruned // rows` lowest scores, and when the count
    does not divide evenly the rows whose next-lowest score is smallest prune one more.

    Args:
        weight: (out, in).
        input_norms: (in,), ||X_j||₂ over the calibration tokens.
        sparsity: fraction of zeros (ignored with `pattern`).
        pattern: `(n, m)`: keep n of every m consecutive input weights of each row.
    """
    score = weight.detach().float().abs() * input_norms.float()[None, :]  # (out, in)
    if pattern is not None:
        return nm_mask(score, *pattern)
    rows, cols = score.shape
    per_row, extra = divmod(rows * cols - num_kept(rows * cols, sparsity), rows)
    order = score.argsort(dim=1)  # ascending within each row
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, order[:, :per_row], False)
    if extra:
        candidates = order[:, per_row]  # each row's next-lowest score
        chosen = score.gather(1, candidates[:, None]).squeeze(1).topk(extra, largest=False).indices
        keep[chosen, candidates[chosen]] = False
    return keep

"""Magnitude pruning: keep the largest |W| of each layer (Han et al. 2015, arXiv 1506.02626), the baseline of the
SparseGPT and Wanda papers. Needs no calibration data; with N:M, within every run of m input weights of a row.
"""

from __future__ import annotations

import torch

from modelzoo.sparsity.masks import topk_mask
from modelzoo.sparsity.nm import nm_mask


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool mask (True = kept) of `weight` (out, in): layer-wise top-|W| at `sparsity`, or N:M `pattern`."""
    score = weight.detach().float().abs()
    return topk_mask(score, sparsity) if pattern is None else nm_mask(score, *pattern)

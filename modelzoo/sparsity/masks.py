"""Mask primitives with the counting rules of `cerebras.pytorch.sparse.utils`.

cstorch sizes every mask in float32 and truncates: a tensor of `numel` entries at sparsity `s` keeps
`int(float32(1 - s) * float32(numel))` entries (`make_mask_topk_sparsity`), and dropping a fraction `d` of a
mask's `nnz` connections keeps `int(float32(1 - d) * float32(nnz))` (`make_mask_drop_minimum`). Mirroring the
rule makes our masks the same size as cstorch's at every level a schedule produces.
"""

from __future__ import annotations

import torch
from torch import nn

MASK_SUFFIX = "_mask"  # a sparse parameter `<name>` has the persistent bool buffer `<name>_mask` beside it


def attach_mask(model: nn.Module, name: str, mask: torch.Tensor) -> torch.Tensor:
    """Register `mask` (bool, on the parameter's device) as the persistent buffer `<name>_mask` beside parameter
    `name` of `model`, the one place masks enter a model (checkpoints and exports carry them by that name)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    weight = getattr(module, leaf)
    if mask.shape != weight.shape:
        raise ValueError(f"mask of {name} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    module.register_buffer(leaf + MASK_SUFFIX, mask, persistent=True)
    return mask


def num_kept(count: int, fraction_removed: float) -> int:
    """cstorch's `((1 - fraction) * count).int()`, in float32: entries kept of `count`."""
    keep = 1.0 - torch.tensor(fraction_removed, dtype=torch.float32)
    return int(keep * torch.tensor(float(count), dtype=torch.float32))


def keep_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of `score`'s shape that is True at its `k` largest entries."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.flatten().float(), k, sorted=False).indices] = True
    return mask.view_as(score)


def topk_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest scores at `sparsity` (cstorch `make_mask_topk_sparsity`)."""
    return keep_top(score, num_kept(score.numel(), sparsity))


def drop_smallest(score: torch.Tensor, mask: torch.Tensor, drop_fraction: float) -> tuple[torch.Tensor, int]:
    """Drop `drop_fraction` of the connections in `mask`, those with the smallest `score` (cstorch
    `make_mask_drop_minimum`). Returns the reduced mask, always a subset of `mask`, and its number of entries.
    """
    k = num_kept(int(mask.sum()), drop_fraction)
    return keep_top(torch.where(mask, score.float(), float("-inf")), k), k


def grow_largest(score: torch.Tensor, mask: torch.Tensor, sparsity: float, nnz: int) -> torch.Tensor:
    """Add the highest-scoring positions outside `mask` (which holds `nnz` entries) until the mask is at
    `sparsity` (cstorch `make_mask_grow_maximum`); positions just dropped may be regrown.
    """
    grow = max(num_kept(score.numel(), sparsity) - nnz, 0)
    return mask | keep_top(torch.where(mask, float("-inf"), score.float()), grow)

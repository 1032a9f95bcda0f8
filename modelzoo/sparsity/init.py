"""Mask initialisation (Cerebras `init_method`): keep the top-scoring (1 - sparsity) fraction of entries."""

from __future__ import annotations

import torch


def topk_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping exactly round((1 - sparsity) * numel) entries with the largest scores."""
    keep = round((1.0 - sparsity) * score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if keep > 0:
        mask[torch.topk(score.flatten().float(), keep, sorted=False).indices] = True
    return mask.view_as(score)


def init_mask(weight: torch.Tensor, sparsity: float, method: str, generator: torch.Generator) -> torch.Tensor:
    """`random`: uniformly random positions; `topk`: the largest magnitudes of `weight`."""
    if method == "random":
        score = torch.rand(weight.shape, generator=generator, device=generator.device)
    elif method == "topk":
        score = weight.detach().abs()
    else:
        raise ValueError(f"unknown init_method {method!r}")
    return topk_mask(score.to(weight.device), sparsity)

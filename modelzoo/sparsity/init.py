"""Mask initialisation (`init_method`), after `cerebras.pytorch.sparse.init`.

- `random`: uniformly random positions (top-k of a uniform score drawn from the plug-in's generator);
- `topk`: the largest magnitudes of the weight;
- `from_weights` (Cerebras' name: `from_zeros`): the nonzeros of the weight as loaded, e.g. from a one-shot
  pruned checkpoint; the configured level is not enforced;
- `checkerboard`: an evenly spread pattern, each row shifted (cstorch's stress-test pattern).

With an N:M `pattern`, `random` and `topk` choose within every run of M input weights instead.
"""

from __future__ import annotations

import math

import torch

from modelzoo.sparsity.masks import topk_mask
from modelzoo.sparsity.nm import nm_mask

INIT_METHODS = ("random", "topk", "from_weights", "from_zeros", "checkerboard")


def init_mask(
    weight: torch.Tensor,
    sparsity: float,
    method: str,
    generator: torch.Generator,
    pattern: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The initial bool mask of `weight` at `sparsity` (`pattern`: N:M as `(n, m)`, which sets the level itself)."""
    if method in ("from_weights", "from_zeros"):
        return weight.detach() != 0
    if method == "checkerboard":
        return checkerboard_mask(weight.shape, sparsity).to(weight.device)
    if method == "random":
        score = torch.rand(weight.shape, generator=generator, device=generator.device).to(weight.device)
    elif method == "topk":
        score = weight.detach().abs()
    else:
        raise ValueError(f"unknown init_method {method!r}; allowed: {', '.join(INIT_METHODS)}")
    return topk_mask(score, sparsity) if pattern is None else nm_mask(score, *pattern)


def checkerboard_mask(shape: torch.Size, sparsity: float) -> torch.Tensor:
    """cstorch's `checkerboard`: kept entries spread evenly along each row, every row rolled by one period."""
    density = 1.0 - float(torch.tensor(sparsity, dtype=torch.float32))
    cols = shape[-1]
    padding = math.ceil(cols / density + 1e-5)
    steps = torch.floor(torch.arange(cols + padding) * density + 1e-5)
    row = steps[1:] != steps[:-1]  # (cols + padding - 1,)
    if len(shape) == 1:
        return row[:cols].clone()
    shift = -math.floor(1 / density - 1e-5)
    # torch.roll(row, r * shift) for each row r, as one gather: rolled[j] = row[(j - r * shift) % len(row)]
    index = (torch.arange(cols)[None, :] - torch.arange(shape[0])[:, None] * shift) % row.numel()
    return row[index]

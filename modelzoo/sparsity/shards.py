"""A rank's rows of an FSDP2-sharded tensor (`DTensor`, `Shard(0)`), and the whole mask's rows that match them.

Plain tensors pass through unchanged, so the sparsity plug-in runs the same code with or without sharding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._tensor import DTensor  # the public `torch.distributed.tensor.DTensor` from torch 2.5


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (a view: writing it writes the shard), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every rank (the same bits on each), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of a whole `mask` that this rank holds of `like`: FSDP2 gives rank r the r-th of
    `torch.chunk(rows, world)` (ranks past the last chunk hold none); `mask` itself for a plain tensor."""
    if not isinstance(like, DTensor):
        return mask
    mesh = like.device_mesh
    chunks = mask.chunk(mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    rows = chunks[rank] if rank < len(chunks) else mask[:0]
    if rows.shape != like.to_local().shape:
        raise RuntimeError(f"mask rows {tuple(rows.shape)} do not match the shard {tuple(like.to_local().shape)}")
    return rows


def sum_over_shards(counts: torch.Tensor) -> torch.Tensor:
    """`counts` summed over the ranks that hold the shards (in place; returned)."""
    dist.all_reduce(counts)
    return counts

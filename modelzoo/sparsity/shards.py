"""A rank's rows of an FSDP2-sharded tensor (`DTensor`, `Shard(0)`), and masks sharded like their weights.

Plain tensors pass through unchanged, so the sparsity plug-in runs the same code with or without sharding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._tensor import DTensor  # the public `torch.distributed.tensor.DTensor` from torch 2.5


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a `DTensor` (of which this rank holds some rows)."""
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (a view: writing it writes the shard), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from every rank (the same bits on each), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def rows(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of `whole` that this rank holds of the sharded `like`: FSDP2 gives rank r the r-th of
    `torch.chunk(rows, world)` (ranks past the last chunk hold none); `whole` itself when `like` is a plain tensor."""
    if not isinstance(like, DTensor):
        return whole
    mesh = like.device_mesh
    chunks = whole.chunk(mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    mine = chunks[rank] if rank < len(chunks) else whole[:0]
    if mine.shape != like.to_local().shape:
        raise RuntimeError(f"rows {tuple(mine.shape)} do not match the shard {tuple(like.to_local().shape)}")
    return mine


def local_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of `mask` that match its rows of `like` (a sharded mask's own, or a whole mask's rows)."""
    return mask.to_local() if isinstance(mask, DTensor) else rows(mask, like)


def shard_like(whole: torch.Tensor, like: DTensor) -> DTensor:
    """`whole` sharded as `like` is (the same mesh and rows), keeping only this rank's rows."""
    local_rows = rows(whole, like).clone()  # not a view, so the whole tensor can be freed
    return DTensor.from_local(local_rows, like.device_mesh, like.placements, shape=whole.shape, stride=whole.stride())


def sum_over_shards(counts: torch.Tensor) -> torch.Tensor:
    """`counts` summed over the ranks that hold the shards (in place; returned)."""
    dist.all_reduce(counts)
    return counts

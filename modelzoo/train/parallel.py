"""Data parallelism plug-ins, chosen by `task.parallelism`: whole replicas (DDP) or sharded ones (FSDP2).

The loop sees one small interface (`Parallelism`): the forward it calls, whether a micro-batch's backward
synchronises gradients, what runs after the last backward of a step, and which checkpoint layout the run writes.

- `ddp` (`Replicated`): `DistributedDataParallel`; gradients all-reduced once per step, on the last micro-batch.
  Masks are buffers that every rank updates identically (`broadcast_buffers=False`).
- `fsdp` (`FullyShardedDP`): torch's FSDP2 `fully_shard` on each transformer block, then on the root (torchtitan's
  `apply_fsdp`); each rank holds dim-0 rows of every parameter, its mask, its gradient and its AdamW moments
  (`shard_masks`). Gradients are
  reduce-scattered after every micro-batch's backward and accumulate sharded (as torchtitan does: skipping the
  reduction until the last micro-batch would keep a whole fp32 gradient of the model on every rank through the
  accumulation, 4 bytes a parameter, more than all the sharded state at 8 ranks); after the last backward the
  sparsity plug-in masks the sharded gradients
  (`MaskedSparsity.mask_gradients`) before clipping, which gives the same bits as masking before the reduction,
  since the reduction is elementwise. With `task.precision=bf16` parameters are gathered in bf16 and gradients
  reduced in fp32 (`MixedPrecisionPolicy`). Checkpoints are `torch.distributed.checkpoint` directories that any
  number of ranks can resume (`modelzoo.checkpoint.save_checkpoint` with `shards`). In one process (no torchrun) nothing
  is sharded, but the run writes and reads the same sharded layout, so it can move between 1 and N ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel

from modelzoo.distributed import Distributed
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.sparsity.shards import shard_like

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Parallelism:
    """How the loop runs data-parallel; this base is one process alone: the model's own forward, nothing to
    synchronise, whole-model checkpoints."""

    sharded_checkpoints = False  # checkpoints written with torch.distributed.checkpoint (each rank its part)

    def wrap(self, model: nn.Module, forward: Forward) -> Forward:
        """The forward the loop calls; `model` may be changed in place (before its optimizer is built)."""
        return forward

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """Around the forward of one micro-batch (its backward follows); `last`: the step's last, whose gradients
        are reduced over the ranks."""
        return nullcontext()

    def after_backward(self) -> None:
        """After the step's last backward, before gradient clipping."""

    def whole_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """`model`'s whole state dict on rank 0 (other ranks: None; sharded: gathered once onto rank 0's CPU, a
        collective every rank calls), or None where the live model is whole (use it)."""
        return None


class Replicated(Parallelism):
    """DDP: a whole replica on each rank, gradients all-reduced on the step's last micro-batch."""

    def __init__(self) -> None:
        self.replica: DistributedDataParallel | None = None

    def wrap(self, model: nn.Module, forward: Forward) -> Forward:
        # Masks are buffers that every rank updates identically: nothing to broadcast.
        self.replica = DistributedDataParallel(model, broadcast_buffers=False)
        return self.replica

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return nullcontext() if last else self.replica.no_sync()


class FullyShardedDP(Parallelism):
    """FSDP2 (module docstring); `after_backward` is given the sparsity plug-in's sharded-gradient masking."""

    sharded_checkpoints = True

    def __init__(self, dist: Distributed, precision: str, after_backward: Callable[[], None] | None) -> None:
        self.dist, self.precision, self._after_backward = dist, precision, after_backward
        self.root: nn.Module | None = None

    def wrap(self, model: nn.Module, forward: Forward) -> Forward:
        if not self.dist.enabled:
            return forward
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # public from torch 2.6 (validated)

        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.precision == "bf16" else None, reduce_dtype=torch.float32
        )
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        # The root (embeddings, final norm, head) is gathered for the whole step: it is used first and last.
        fully_shard(model, mp_policy=policy, reshard_after_forward=False)
        shard_masks(model)
        self.root = model
        return forward

    def after_backward(self) -> None:
        if self.root is not None and self._after_backward is not None:
            self._after_backward()

    def whole_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        if self.root is None:
            return None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 alone keeps the whole tensors
        state = get_model_state_dict(model, options=options)
        return state if self.dist.is_main else None


def shard_masks(model: nn.Module) -> None:
    """Replace each whole `<param>_mask` buffer by a `DTensor` of the rows this rank holds of its parameter, so masks
    cost 1/ranks of a byte an element like the state they mask, and checkpoints reshard them with their weights."""
    for name, mask in list(model.named_buffers()):
        if name.endswith(MASK_SUFFIX):
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            module.register_buffer(leaf, shard_like(mask, getattr(module, leaf.removesuffix(MASK_SUFFIX))))


def fsdp_problem() -> str | None:
    """Why `task.parallelism=fsdp` cannot run with this torch (None: it can). FSDP2's `fully_shard` is public from
    torch 2.6; torch 2.4 (the Cerebras venv's) has only the private `torch.distributed._composable.fsdp`, whose first
    forward fails on CPU creating CUDA streams (docs/gpu.md)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (public from torch 2.6)"
    return None


def data_parallel(
    parallelism: str, dist: Distributed, precision: str, mask_gradients: Callable[[], None] | None
) -> Parallelism:
    """The plug-in `task.parallelism` names (`ddp` or `fsdp`; `mask_gradients`: the sparsity plug-in's masking of
    sharded gradients); without torchrun `ddp` is one plain process."""
    if parallelism == "fsdp":
        return FullyShardedDP(dist, precision, mask_gradients)
    return Replicated() if dist.enabled else Parallelism()

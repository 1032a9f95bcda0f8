"""Data parallelism under `torchrun`: process group, rank-0-first sections and reductions.

`torchrun --nproc_per_node=N -m modelzoo pretrain ...` starts N processes; each holds a full replica wrapped
in `DistributedDataParallel` (or, with `task.parallelism=fsdp`, its shard of the model: `modelzoo.train.parallel`)
and reads its own shard of every batch (`BlockLoader` takes rank / world_size).
`task.batch_size` stays the global batch: each rank runs `batch_size / (micro_batch_size x N)` micro-batches
per step. Without torchrun's environment (`WORLD_SIZE` unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics, logs and the export."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0 first (e.g. building a cache), then on the other ranks (reading it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` (a picklable object), on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks (in place; returned for chaining)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` averaged over the ranks (gloo has no AVG reduction, so: sum, then divide)."""
        return self.sum(tensor).div_(self.world_size)


def world_size() -> int:
    """The number of processes torchrun started for this job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str) -> Distributed:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), or run alone without it."""
    if world_size() == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def says_first(message: str, timeout_s: float = 10.0) -> bool:
    """Under torchrun, on a refusal: whether this rank should print `message`, after waiting (up to `timeout_s`)
    for every rank to refuse too, so that all exit together with their own exit code (torchrun stops the ranks
    still running with SIGTERM as soon as one ends). Rank 0 prints; another rank only a message rank 0 did not
    give, or when rank 0 does not refuse in time. Meets in torchrun's own store (`MASTER_ADDR:MASTER_PORT`),
    before any process group exists; without torchrun, or without its store, every rank prints."""
    if world_size() == 1:
        return True
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"modelzoo/refusal/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
        )  # fmt: skip
        store.set(f"{prefix}/{rank}", message)
        arrived, deadline = store.add(f"{prefix}/count", 1), time.monotonic() + timeout_s
        while arrived < world_size() and time.monotonic() < deadline:
            time.sleep(0.05)
            arrived = store.add(f"{prefix}/count", 0)
        first = store.get(f"{prefix}/0").decode() if store.check([f"{prefix}/0"]) else None
    except (KeyError, ValueError, RuntimeError):  # no store to meet in (DistStoreError is a RuntimeError)
        return True
    return rank == 0 or first != message


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_across_ranks(tensors: list[torch.Tensor]) -> None:
    """Average tensors in place over the ranks of the default process group (no-op when there is none)."""
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor)
    torch._foreach_div_(tensors, dist.get_world_size())

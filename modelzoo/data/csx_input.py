"""Input functions for a CS-2 cluster's input workers: `cstorch.utils.data.DataLoader(train_input, path, ...)`.

cstorch pickles the input function by reference (module and name) and its arguments by value (dill) into every
run request; each appliance worker imports this module from `cluster.python_paths` and calls the function itself.
So this module imports only numpy, torch, `modelzoo.data.loader` (numpy and torch), `modelzoo.data.shards` (numpy)
and, on a worker, cstorch; the arguments are small (a split directory, sizes, a seed); the blocks are read
memory-mapped from the prepared corpus's shards, which must be on a volume in `cluster.mount_dirs`.

Batches come in the order of masked_dense's one-source `BlockLoader` (global sample `i` is block `perm[i % N]` of
epoch `i // N`'s permutation; a global batch is the next `B` samples), `(B, T)` with the batch in dim 0 as cstorch
expects. Each worker
streams every `workers`-th global batch (round-robin by its local rank) and each CS-2 takes its slice of it, as
cstorch's `ShardedSampler` does: together the workers of all systems stream every global batch exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelzoo.data.loader import stream_rows, to_batch
from modelzoo.data.shards import ShardedBlocks, open_prepared


def read_blocks(path: str) -> ShardedBlocks:
    """The packed blocks `(num_blocks, seq_len + 1)` of the prepared split directory `path` (`<corpus>/train`),
    memory-mapped: the one place the input workers read data."""
    return open_prepared(path)


@dataclass(frozen=True)
class Shard:
    """Which part of every global batch one input worker streams: `worker` of `workers` per CS-2, CS-2 `system`
    of `systems`."""

    workers: int = 1
    worker: int = 0
    systems: int = 1
    system: int = 0

    @classmethod
    def of_this_process(cls) -> Shard:
        """On an appliance input worker, its place in the cluster (what `ShardedSampler` reads); elsewhere 1x1."""
        try:
            import cerebras.pytorch as cstorch
        except ImportError:
            return cls()
        if not cstorch.distributed.is_streamer():
            return cls()
        spec = cstorch.distributed.service_resolver().cluster_spec
        task = spec.task()
        return cls(spec.num_workers_per_csx, task.local_rank, spec.num_csx, task.wse_id)


class TrainBatches:
    """Endless `(x, y)` training batches of one shard, restartable (cstorch's `RestartableDataLoader` protocol).

    The state is the number of global batches streamed so far; `BlockLoader`'s global sample index is that times
    the global batch size.
    """

    def __init__(self, path: str, global_batch_size: int, seed: int, shuffle: bool = True, shard: Shard = Shard()):
        self.blocks = read_blocks(path)
        self.batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shard = shard
        if len(self.blocks) < global_batch_size or global_batch_size % shard.systems:
            raise ValueError(
                f"{path}: {len(self.blocks)} blocks in global batches of {global_batch_size} over {shard.systems} "
                "CS-2(s) (refused at config time)"
            )
        self.next_global = 0

    def global_batch(self, index: int) -> np.ndarray:
        """The block indices of global batch `index` (0 is the first batch of epoch 0)."""
        return stream_rows(len(self.blocks), self.seed, index * self.batch_size, self.batch_size, self.shuffle)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        local = self.batch_size // self.shard.systems
        while True:
            index = self.next_global
            self.next_global += 1
            if index % self.shard.workers == self.shard.worker:
                rows = self.global_batch(index)[self.shard.system * local : (self.shard.system + 1) * local]
                yield to_batch(self.blocks[rows])

    # ---- cstorch's RestartableDataLoader protocol --------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Global batches streamed. On a worker (called by cstorch at a checkpoint step) the count of batches this
        worker streamed that the system consumed, with where it streams them, for `aggregate_state_dict`."""
        if self.shard == Shard():
            return {"global_batches": self.next_global}
        import cerebras.pytorch as cstorch

        state = cstorch.distributed.get_worker_state()
        return {"worker_batches": int(state.worker_step), "system": self.shard.system}

    def aggregate_state_dict(self, worker_states: list[dict[str, int]]) -> dict[str, int]:
        """One state from all workers': the global batches that the workers of the first CS-2 streamed together."""
        if all("global_batches" in s for s in worker_states):
            return {"global_batches": max(s["global_batches"] for s in worker_states)}
        return {"global_batches": sum(s["worker_batches"] for s in worker_states if s["system"] == 0)}

    def deaggregate_state_dict(self, aggregated: dict[str, int], strict: bool = True) -> dict[str, int]:
        return dict(aggregated)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        self.next_global = int(state["global_batches"])


def train_input(path: str, global_batch_size: int, seed: int, shuffle: bool = True) -> TrainBatches:
    """cstorch's input function for training: this worker's shard of the global batches of the corpus file."""
    return TrainBatches(path, global_batch_size, seed, shuffle, Shard.of_this_process())


def eval_input(path: str, batch_size: int, max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """cstorch's input function for evaluation: the first `max_batches` full batches of the validation file in
    order (a CS-2 needs equal batch sizes, so a last, shorter batch is left out)."""
    blocks = read_blocks(path)
    count = len(blocks) // batch_size if max_batches is None else min(max_batches, len(blocks) // batch_size)
    return [to_batch(blocks[i * batch_size : (i + 1) * batch_size]) for i in range(count)]

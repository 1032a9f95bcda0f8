"""Input functions for a CS-2 cluster's input workers: `cstorch.utils.data.DataLoader(train_input, path, ...)`.

cstorch pickles the input function by reference (module and name) and its arguments by value (dill) into every
run request; each appliance worker imports this module from `cluster.python_paths` and calls the function itself.
So this module imports only numpy, torch, `modelzoo.data.loader` (numpy and torch), `modelzoo.data.shards` (numpy)
and, on a worker, cstorch; the arguments are small (a split directory, sizes, a seed); the blocks are read
memory-mapped from the prepared corpus's shards, which must be on a volume in `cluster.mount_dirs`.

Batches come in the order of masked_dense's one-source `BlockLoader` (global sample `i` is block `perm[i % N]` of
epoch `i // N`'s permutation; a global batch is the next `B` samples), `(B, T)` with the batch in dim 0 as cstorch
expects. As cstorch's `ShardedSampler` does, each worker streams every `workers`-th global batch, counted from where
its stream started (the executor's first batch goes to local rank 0), and each CS-2 takes its slice of it (the
sizes cstorch's `get_streaming_batch_size` gives each CS-2): together the workers of all systems stream every
global batch exactly once.

Restarts follow the Model Zoo's `RestartableDataLoader` contract. cstorch builds the workers afresh at every
executor and loads them from the state it aggregated at the previous executor's last step (or a checkpoint's):
each worker's state is the global samples streamed before its stream started plus the samples it streamed since
(cstorch's worker state); the aggregate is the former plus the sum of the latter over all workers.
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
    of `systems`, whose slices of a global batch have `sizes` samples (empty: equal slices)."""

    workers: int = 1
    worker: int = 0
    systems: int = 1
    system: int = 0
    sizes: tuple[int, ...] = ()

    @classmethod
    def of_this_process(cls, global_batch_size: int) -> Shard:
        """On an appliance input worker, its place in the cluster and each CS-2's slice of a global batch (what
        `ShardedSampler` reads from cstorch); elsewhere 1x1."""
        try:
            import cerebras.pytorch as cstorch
        except ImportError:
            return cls()
        if not cstorch.distributed.is_streamer():
            return cls()
        spec = cstorch.distributed.service_resolver().cluster_spec
        sizes = [0] * spec.num_csx
        for task in spec.tasks:
            sizes[task.wse_id] = cstorch.distributed.get_streaming_batch_size(global_batch_size, task.rank)
        task = spec.task()
        return cls(spec.num_workers_per_csx, task.local_rank, spec.num_csx, task.wse_id, tuple(sizes))

    def rows(self, global_batch_size: int) -> slice:
        """This CS-2's slice of a global batch of `global_batch_size` samples."""
        sizes = self.sizes or (global_batch_size // self.systems,) * self.systems
        if len(sizes) != self.systems or sum(sizes) != global_batch_size:
            raise ValueError(f"CS-2 slices {sizes} do not split a global batch of {global_batch_size}")
        start = sum(sizes[: self.system])
        return slice(start, start + sizes[self.system])


class TrainBatches:
    """Endless `(x, y)` training batches of one shard, restartable (cstorch's `RestartableDataLoader` protocol).

    `start` is the global batch this instance's stream begins at (the loaded state), `next_global` the next global
    batch it passes over; `BlockLoader`'s global sample index is a global batch index times the global batch size.
    """

    def __init__(self, path: str, global_batch_size: int, seed: int, shuffle: bool = True, shard: Shard = Shard()):
        self.blocks = read_blocks(path)
        self.batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shard = shard
        if len(self.blocks) < global_batch_size or global_batch_size < shard.systems:
            raise ValueError(
                f"{path}: {len(self.blocks)} blocks in global batches of {global_batch_size} over {shard.systems} "
                "CS-2(s) (refused at config time)"
            )
        self.rows = shard.rows(global_batch_size)
        self.start = self.next_global = 0

    def global_batch(self, index: int) -> np.ndarray:
        """The block indices of global batch `index` (0 is the first batch of epoch 0)."""
        return stream_rows(len(self.blocks), self.seed, index * self.batch_size, self.batch_size, self.shuffle)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.start = self.next_global
        while True:
            index = self.next_global
            self.next_global += 1
            if (index - self.start) % self.shard.workers == self.shard.worker:
                yield to_batch(self.blocks[self.global_batch(index)[self.rows]])

    # ---- cstorch's RestartableDataLoader protocol (the Model Zoo's contract) ------------------------------
    def state_dict(self) -> dict[str, int]:
        """Called by cstorch at a checkpoint step, on a worker or (CPU backend, before a CSX run) the user node:
        the global samples streamed before this stream started, and the samples this worker streamed since."""
        import cerebras.pytorch as cstorch

        return {
            "previous_samples_streamed": self.start * self.batch_size,
            "samples_streamed": int(cstorch.distributed.get_worker_state().samples_streamed),
        }

    def aggregate_state_dict(self, worker_states: list[dict[str, int]]) -> dict[str, int]:
        """One state from all workers': where their streams started plus what all of them streamed since."""
        previous = {s["previous_samples_streamed"] for s in worker_states}
        if len(previous) != 1:
            raise ValueError(f"input workers started their streams at different samples: {sorted(previous)}")
        return {"samples_streamed": previous.pop() + sum(s["samples_streamed"] for s in worker_states)}

    def deaggregate_state_dict(self, aggregated: dict[str, int], strict: bool = True) -> dict[str, int]:
        return dict(aggregated)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue from `state["samples_streamed"]` global samples, a whole number of global batches."""
        samples = int(state["samples_streamed"])
        if samples % self.batch_size:
            raise ValueError(f"{samples} samples streamed is not a whole number of global batches of {self.batch_size}")
        self.start = self.next_global = samples // self.batch_size


def train_input(path: str, global_batch_size: int, seed: int, shuffle: bool = True) -> TrainBatches:
    """cstorch's input function for training: this worker's shard of the global batches of the corpus file."""
    return TrainBatches(path, global_batch_size, seed, shuffle, Shard.of_this_process(global_batch_size))


def eval_input(path: str, batch_size: int, max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """cstorch's input function for evaluation: the first `max_batches` full batches of the validation file in
    order (a CS-2 needs equal batch sizes, so a last, shorter batch is left out)."""
    blocks = read_blocks(path)
    count = len(blocks) // batch_size if max_batches is None else min(max_batches, len(blocks) // batch_size)
    return [to_batch(blocks[i * batch_size : (i + 1) * batch_size]) for i in range(count)]

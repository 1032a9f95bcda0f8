"""Batches of packed token blocks: a resumable, rank-sharded training loader and a sequential eval iterator.

A block is `seq_len + 1` tokens; a batch is `x = blocks[:, :-1]`, `y = blocks[:, 1:]`, both int64.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from modelzoo.errors import DataError


def to_batch(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(np.asarray(blocks, dtype=np.int64))  # (B, T + 1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) inputs, (B, T) targets


def epoch_order(num_blocks: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """All block indices in the order epoch `epoch` visits them: `torch.randperm` seeded `seed + epoch`."""
    if shuffle:
        return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed + epoch))
    return torch.arange(num_blocks)


class BlockLoader:
    """Endless shuffled batches of training blocks, identical on every rank, machine and resume.

    Epoch `e` visits the blocks in the order `torch.randperm` gives with seed `seed + e` (or in file
    order without `shuffle`); rank `r` of `world_size` takes every `world_size`-th of them from position
    `r`, so ranks never share a block within an epoch. Each rank gets the same number of full batches per
    epoch; the blocks left over are skipped (a different set each epoch when shuffled).

    Args:
        blocks: packed blocks, shape (num_blocks, seq_len + 1).
        batch_size: blocks per batch on this rank (`task.micro_batch_size`).
        seed: base seed of the epoch permutations.
        shuffle: permute the blocks each epoch.
        rank: this process's rank.
        world_size: the number of ranks sharing the blocks.
        source: what the blocks came from, for error messages (e.g. the training files).

    Raises:
        DataError: fewer blocks than one batch per rank.
    """

    def __init__(
        self,
        blocks: np.ndarray,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        source: str = "the training corpus",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = len(blocks) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                source,
                f"{len(blocks)} blocks of data.seq_len + 1 = {blocks.shape[1]} tokens make no batch of "
                f"task.micro_batch_size={batch_size} on each of {world_size} rank(s); lower data.seq_len or "
                "task.micro_batch_size, or add training documents",
            )
        self.epoch = 0
        self.position = 0  # the next batch within the epoch
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's block indices for `epoch`, cut to whole batches."""
        order = epoch_order(len(self.blocks), self.seed, epoch, self.shuffle)
        return order[self.rank :: self.world_size][: self.batches_per_epoch * self.batch_size].numpy()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) pair of int64 tensors, each (batch_size, seq_len); wraps into the next epoch."""
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        start = self.position * self.batch_size
        self.position += 1
        return to_batch(self.blocks[self._order[start : start + self.batch_size]])

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: restoring it replays exactly the batches that would have come next."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()` of a loader built with the same blocks, batch size, seed and ranks."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"loader state {state} is outside {self.batches_per_epoch} batches per epoch")
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)


class StepBatches:
    """The batches of successive optimizer steps, endlessly: `accumulation` micro-batches of `loader`, stacked.

    Each item is (inputs, targets) of shape (accumulation, micro_batch_size, seq_len). Iterating continues
    from the loader's position. A plain object rather than a generator, so that cstorch can pickle it and
    ship it to a CS-2 cluster's input workers.
    """

    def __init__(self, loader: BlockLoader, accumulation: int) -> None:
        self.loader = loader
        self.accumulation = accumulation

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            micro = [self.loader.next_batch() for _ in range(self.accumulation)]
            yield torch.stack([x for x, _ in micro]), torch.stack([y for _, y in micro])


def iter_eval(
    blocks: np.ndarray, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential (x, y) batches over `blocks`, the last one possibly smaller; at most `max_batches` of them."""
    stops = range(0, len(blocks), batch_size)
    for start in stops if max_batches is None else stops[:max_batches]:
        yield to_batch(blocks[start : start + batch_size])

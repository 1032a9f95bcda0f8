"""Batches of packed token blocks: a resumable, rank-sharded training loader and a sequential eval iterator.

A block is `seq_len + 1` tokens; a batch is `x = blocks[:, :-1]`, `y = blocks[:, 1:]`, both int64.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from modelzoo.errors import DataError

CHOICE_CHUNK = 4096  # global samples whose sources are drawn by one seeded generator


def to_batch(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(np.asarray(blocks, dtype=np.int64))  # (B, T + 1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) inputs, (B, T) targets


def epoch_order(num_blocks: int, seed: int, epoch: int, shuffle: bool = True, source: int = 0) -> np.ndarray:
    """All block indices of source `source` in the order its epoch `epoch` visits them (a permutation seeded
    with (`seed`, `source`, `epoch`); file order without `shuffle`)."""
    if shuffle:
        return np.random.default_rng([seed, source, epoch]).permutation(num_blocks)
    return np.arange(num_blocks)


def stream_rows(num_blocks: int, seed: int, start: int, count: int, shuffle: bool = True) -> np.ndarray:
    """The blocks of global samples `start .. start + count - 1` of a one-source `BlockLoader` stream."""
    samples = np.arange(start, start + count)
    rows = np.empty(count, dtype=np.int64)
    for epoch in np.unique(samples // num_blocks):
        where = samples // num_blocks == epoch
        rows[where] = epoch_order(num_blocks, seed, int(epoch), shuffle)[samples[where] % num_blocks]
    return rows


class BlockLoader:
    """Endless shuffled batches of training blocks from one or more sources, the same on every rank and resume.

    All ranks read one global stream of samples. Sample `i` comes from source `j`, drawn with probability
    `weights[j]` by a generator seeded with (`seed`, `i // CHOICE_CHUNK`) (always source 0 when there is
    one); it is that source's `n`-th sample, where `n` counts the earlier samples drawn from it, and that
    is block `perm[n % N]` of the source's `N` blocks, `perm` the permutation of its epoch `n // N` (seeded
    with `seed`, the source and the epoch; file order without `shuffle`). A micro-batch step takes the next
    `world_size * batch_size` samples, rank `r` the `r`-th run of `batch_size` of them.

    The position is a global sample index plus the samples drawn per source, so a run may resume with
    another `task.micro_batch_size` or world size: as long as the global batch is the same, every optimizer
    step sees the same samples.

    Args:
        sources: each source's packed blocks, shape (num_blocks, seq_len + 1), one width for all.
        batch_size: blocks per batch on this rank (`task.micro_batch_size`).
        seed: base seed of the draws and permutations.
        weights: sampling weight per source (normalised; default: one source, or equal weights).
        shuffle: permute each source's blocks every epoch.
        rank: this process's rank.
        world_size: the number of ranks sharing the stream.
        names: the sources' names, for error messages and reports (e.g. the training files).

    Raises:
        DataError: fewer blocks than one batch per rank, or a source without blocks.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        batch_size: int,
        seed: int,
        weights: Sequence[float] | None = None,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        names: Sequence[str] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.sources = list(sources)
        self.names = list(names) if names is not None else [f"source {j}" for j in range(len(self.sources))]
        weights = np.ones(len(self.sources)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.weights = weights / weights.sum()
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.sizes = [len(blocks) for blocks in self.sources]
        for name, blocks in zip(self.names, self.sources, strict=True):
            if len(blocks) < (batch_size * world_size if len(self.sources) == 1 else 1):
                raise DataError(
                    name,
                    f"{len(blocks)} blocks of data.seq_len + 1 = {blocks.shape[1]} tokens make no batch of "
                    f"task.micro_batch_size={batch_size} on each of {world_size} rank(s); lower data.seq_len or "
                    "task.micro_batch_size, or add training documents",
                )
        self.sample = 0  # the next global sample
        self.drawn = np.zeros(len(self.sources), dtype=np.int64)  # global samples drawn per source so far
        self._choices: tuple[int, np.ndarray] | None = None
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _source_of(self, samples: np.ndarray) -> np.ndarray:
        """The source of each global sample index."""
        if len(self.sources) == 1:
            return np.zeros(len(samples), dtype=np.int64)
        out = np.empty(len(samples), dtype=np.int64)
        for chunk in np.unique(samples // CHOICE_CHUNK):
            if self._choices is None or self._choices[0] != chunk:
                rng = np.random.default_rng([self.seed, int(chunk)])
                self._choices = (int(chunk), rng.choice(len(self.sources), size=CHOICE_CHUNK, p=self.weights))
            where = samples // CHOICE_CHUNK == chunk
            out[where] = self._choices[1][samples[where] % CHOICE_CHUNK]
        return out

    def _order(self, source: int, epoch: int) -> np.ndarray:
        """Source `source`'s block order in its epoch `epoch` (the last two epochs' orders are kept)."""
        key = (source, epoch)
        if key not in self._orders:
            order = epoch_order(self.sizes[source], self.seed, epoch, self.shuffle, source)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source or k[1] == epoch - 1}
            self._orders[key] = order
        return self._orders[key]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) pair of int64 tensors, each (batch_size, seq_len); epochs wrap per source."""
        step = self.world_size * self.batch_size
        chosen = self._source_of(np.arange(self.sample, self.sample + step))
        nth = np.empty(step, dtype=np.int64)  # each sample's index within its source's stream
        for j in range(len(self.sources)):
            picks = chosen == j
            nth[picks] = self.drawn[j] + np.arange(int(picks.sum()))
            self.drawn[j] += int(picks.sum())
        self.sample += step
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        blocks = [
            self.sources[j][self._order(j, n // self.sizes[j])[n % self.sizes[j]]]
            for j, n in zip(chosen[mine].tolist(), nth[mine].tolist(), strict=True)
        ]
        return to_batch(np.stack(blocks))

    def tokens_per_source(self, seq_len: int) -> dict[str, int]:
        """Target tokens each source has given all ranks so far (`seq_len` per sample)."""
        return {name: int(count) * seq_len for name, count in zip(self.names, self.drawn, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands (JSON-able): restoring it replays exactly the samples that would have come next."""
        return {"sample": int(self.sample), "drawn": [int(c) for c in self.drawn]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` of a loader over the same sources, weights and seed (any batch size
        and world size).

        Raises:
            ValueError: a state that does not fit these sources (a loader state of another data layout).
        """
        if "sample" not in state or "drawn" not in state:
            raise ValueError(
                f"loader state {state} holds no global sample index (a checkpoint of an older modelzoo); "
                "start a new run_dir"
            )
        sample, drawn = int(state["sample"]), np.asarray(state["drawn"], dtype=np.int64)
        if sample < 0 or len(drawn) != len(self.sources) or drawn.sum() != sample or (drawn < 0).any():
            raise ValueError(f"loader state {state} does not fit {len(self.sources)} source(s)")
        self.sample, self.drawn = sample, drawn


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
    blocks: Any, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential (x, y) batches over `blocks`, the last one possibly smaller; at most `max_batches` of them."""
    stops = range(0, len(blocks), batch_size)
    for start in stops if max_batches is None else stops[:max_batches]:
        yield to_batch(blocks[start : start + batch_size])

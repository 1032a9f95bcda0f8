"""Batches for cstorch's `DataLoader` / `DataExecutor`."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from modelzoo.backends.cerebras.environment import import_cstorch


class _Batches:
    """Our batch iterator as cstorch's `DataLoader` argument, handed over as itself.

    cstorch deep-copies its input function's arguments: the copy would advance while the trainer's loader,
    whose position every checkpoint saves, stayed at its start (a resumed run would see its data again),
    and the corpus would be held twice.
    """

    def __init__(self, batches: Iterable[tuple[torch.Tensor, ...]]) -> None:
        self.batches = batches

    def __deepcopy__(self, memo: dict) -> _Batches:
        return self

    def __getstate__(self) -> dict:
        """Pickled for a cluster's input workers: they get a copy (a memory-mapped corpus becomes an array)."""
        return {"batches": copy.deepcopy(self.batches)}


def _input_fn(batches: _Batches) -> Iterable[tuple[torch.Tensor, ...]]:
    """cstorch's `DataLoader` input function (module level, so that it pickles for a cluster's input workers)."""
    return batches.batches


def executor(batches: Iterable[tuple[torch.Tensor, ...]], steps: int) -> Iterable[tuple[torch.Tensor, ...]]:
    """A `DataExecutor` over `batches` for `steps` steps."""
    data = import_cstorch().utils.data
    return data.DataExecutor(data.DataLoader(_input_fn, _Batches(batches)), num_steps=steps)

"""A pool of tokenising processes that die with their parent, and an ordered, bounded map over it.

`Pool.imap` would read its whole input ahead into memory; `ordered_map` keeps at most `window` items in
flight, so memory stays bounded whatever the corpus size, and yields results in input order, so the
output never depends on the number of workers. Each worker asks the kernel to kill it when its parent dies
(Linux `PR_SET_PDEATHSIG`): a `kill -9` of the preparing process leaves no worker blocked on its queue.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import Pool
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from modelzoo.data.documents import pieces

PR_SET_PDEATHSIG = 1
FLUSH_IDS = 1 << 20  # ids held as Python ints (36 bytes each) before they move into a token-dtype array
_STATE: dict[str, Any] = {}


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def init_tokenizer(tokenizer_json: str, eos: int, dtype: str) -> None:
    """Make `encode_chunk` use this tokenizer (in this process: the preparing one, or a worker)."""
    _STATE.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos=eos, dtype=np.dtype(dtype))


def _init_worker(parent: int, tokenizer_json: str, eos: int, dtype: str) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the pool is the parallelism
    init_tokenizer(tokenizer_json, eos, dtype)


def encode_chunk(texts: list[str]) -> np.ndarray:
    """The documents' tokens, EOS after each, as one array of the corpus's token dtype.

    A long document is encoded piece by piece (`pieces`), its ids gathered in arrays of the token dtype: a 50 MB
    line costs about its own size a few times over, not the gigabytes its `Encoding` objects would hold.
    """
    tokenizer, eos, dtype = _STATE["tokenizer"], _STATE["eos"], _STATE["dtype"]
    parts: list[np.ndarray] = []
    ids: list[int] = []
    for text in texts:
        for piece in pieces(text):
            ids.extend(tokenizer.encode(piece, add_special_tokens=False).ids)
            if len(ids) >= FLUSH_IDS:
                parts.append(np.array(ids, dtype=dtype))
                ids = []
        ids.append(eos)
    parts.append(np.array(ids, dtype=dtype))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class Workers:
    """`workers` processes (or this process alone when `workers == 1`) ready to tokenise and scan files."""

    def __init__(self, workers: int, tokenizer_json: str, eos: int, dtype: np.dtype) -> None:
        self.workers = workers
        self.args = (tokenizer_json, eos, np.dtype(dtype).str)
        self.pool: Pool | None = None

    def __enter__(self) -> Workers:
        if self.workers > 1:
            context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self.pool = context.Pool(self.workers, initializer=_init_worker, initargs=(os.getpid(), *self.args))
        else:
            init_tokenizer(*self.args)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        _STATE.clear()

    def ordered_map(self, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """`function(item)` for each item, in order, with at most 2 items per worker in flight."""
        if self.pool is None:
            yield from map(function, items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self.pool.apply_async(function, (item,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

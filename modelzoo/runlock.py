"""One writer per run directory: an exclusive `flock` on `<run_dir>/.lock`, held for the whole run.

Two processes writing one run directory interleave metrics, prune each other's checkpoints and leave a mix
of two runs that a later resume accepts. The lock is an advisory `fcntl.flock` on an open file: the kernel
drops it when the process ends, however it ends (`kill -9` included), so a lock is never stale and there is
nothing to clean up. The holder writes its pid into the file, for the error the next process gets.

Within one process the lock is re-entrant (the CLI takes it before Hydra writes into the directory, the
trainer again), counted, and released when the last holder lets go.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelzoo.errors import ModelZooError

LOCK_FILE = ".lock"
_held: dict[Path, list[int]] = {}  # resolved run directory -> [file descriptor, holders in this process]


class RunDirLocked(ModelZooError, RuntimeError):
    """Another process holds the run directory."""


def acquire(run_dir: str | os.PathLike) -> None:
    """Take the lock of `run_dir` (created if needed) for this process.

    Raises:
        RunDirLocked: another live process holds it; the message names its pid.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        _held[run_dir][1] += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirLocked(
            f"{run_dir} is in use by process {holder} (it holds {path}); wait for it to finish or stop it, "
            "or give another run_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir] = [fd, 1]


def release(run_dir: str | os.PathLike) -> None:
    """Let go of one hold on `run_dir`'s lock; the last one unlocks it (the file stays, harmlessly)."""
    run_dir = Path(run_dir).resolve()
    entry = _held.get(run_dir)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[run_dir]
        os.close(entry[0])  # closing the descriptor drops the flock


@contextmanager
def locked(run_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold `run_dir`'s lock for the body (`enabled=False`: not at all, e.g. on ranks other than 0)."""
    if not enabled:
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)

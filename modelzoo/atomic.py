"""Atomic directory writes: build a directory beside its target, make it durable, then swap it in."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling directory to fill; on success it replaces `target` whole, on failure it is removed.

    Every file is fsynced before the rename, so after a crash `target` is either the old directory or the
    complete new one. Leftovers of a killed writer (`.<name>.tmp-*`) are removed by the next writer (one writer
    per directory: `modelzoo.runlock`). The directory is created with the process's umask, like any other.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp, which makes it 0700 whatever the umask
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync(path)
        fsync(tmp)
        if target.exists():  # swap: the old directory is removed only once the new one is in place
            old = tmp.with_name(tmp.name + "-old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace a small file in one step (temporary file, fsync, rename); a killed writer's leftover is removed."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)

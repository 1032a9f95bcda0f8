"""Atomic writes: build a file or directory beside its target, make it durable, then swap it in; a write that
would fill the disk is refused before it starts, or ends as one `DiskFullError` with nothing partial left."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelzoo.errors import DiskFullError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How libraries report a write the disk refused: safetensors and torch re-raise the OS error as text, and torch's
# zip writer sees only its own short write ("unexpected pos 8012224 vs 8012116").
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "unexpected pos")


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system that holds `path`, or would once it is created."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _is_disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def disk_space(path: str | os.PathLike, needed: int) -> Iterator[None]:
    """Refuse to write `needed` bytes to `path` when fewer are free; an ENOSPC or EDQUOT inside the block (however a
    library wrapped it) becomes the same `DiskFullError`. The block removes its own partial files first.

    Raises:
        DiskFullError: naming `path`, the bytes needed and the bytes free.
    """
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(path, needed, free)
    try:
        yield
    except Exception as error:
        if not _is_disk_full(error):
            raise
        raise DiskFullError(path, needed, free_bytes(path)) from error


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | os.PathLike, needed: int = 0) -> Iterator[Path]:
    """Yield an empty sibling directory to fill; on success it replaces `target` whole, on failure it is removed.

    Every file is fsynced before the rename, so after a crash `target` is either the old directory or the
    complete new one. Leftovers of a killed writer (`.<name>.tmp-*`) are removed by the next writer (one writer
    per directory: `modelzoo.runlock`). The directory is created with the process's umask, like any other.
    `needed` (bytes, an estimate of what the caller writes) is checked against the free space first (`disk_space`).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with disk_space(target, needed):
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
    write_bytes_atomically(path, text.encode())


def write_bytes_atomically(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to a temporary file beside `path`, fsync it and rename it into place (after a free-space check;
    a failed write leaves no temporary file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with disk_space(path, memoryview(data).nbytes):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            fsync(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    fsync(path.parent)

"""The on-disk layout of a prepared corpus: flat token shards a reader memory-maps, written atomically.

A split is a directory of shards `shard_00000.bin`, `shard_00001.bin`, ...: each the raw little-endian
tokens (uint16, or int32 past 65,535 ids) of whole blocks of `seq_len + 1` tokens, row after row, so
`np.memmap(path, dtype, shape=(blocks, seq_len + 1))` is the shard. Beside each, `shard_00000.json`
records its blocks and dtype and where the token stream continues after it (the next chunk of documents
and how many of its tokens are already in this shard). A shard counts as published once its `.json`
exists: both files are written to a temporary name, fsynced and renamed, the `.bin` first, so a kill
leaves either a published shard or nothing that any reader trusts.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo.atomic import fsync, write_bytes_atomically, write_text_atomically
from modelzoo.errors import DataError

SHARD = "shard_{:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the memory and disk of int32), else int32."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32)


@dataclass(frozen=True)
class Resume:
    """Where a split's token stream continues: chunk `chunk` of its documents, minus its first `skip` tokens;
    `documents` came before that chunk."""

    chunk: int = 0
    skip: int = 0
    documents: int = 0


class ShardWriter:
    """Cuts one split's token stream into shards of `shard_blocks` blocks, publishing each as it fills.

    Memory holds at most one shard plus one chunk of tokens. A writer opened on a directory that already
    holds published shards continues after them (`resume` says where the stream picks up); unpublished
    leftovers of a killed writer are removed.

    Args:
        directory: the split's directory.
        width: tokens per block (`seq_len + 1`).
        dtype: the token dtype of every shard.
        shard_blocks: blocks per shard (the last shard may hold fewer).
    """

    def __init__(self, directory: Path, width: int, dtype: np.dtype, shard_blocks: int) -> None:
        self.directory = directory
        self.width = width
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_blocks * width
        directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        while (directory / f"{SHARD.format(len(self.shards))}.json").is_file():
            self.shards.append(json.loads((directory / f"{SHARD.format(len(self.shards))}.json").read_text()))
        for path in directory.iterdir():
            stem = path.name.lstrip(".").split(".")[0]
            published = stem.startswith("shard_") and int(stem.removeprefix("shard_")) < len(self.shards)
            if not published or ".tmp-" in path.name:
                path.unlink()
        self.resume = Resume(**self.shards[-1]["resume"]) if self.shards else Resume()
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._published = sum(shard["blocks"] for shard in self.shards) * width
        # (chunk, its first token's stream position, documents before it) of the chunks in the buffer
        self._starts: list[tuple[int, int, int]] = []
        self._next = (self.resume.chunk, self.resume.documents)  # the chunk after the last one added

    @property
    def stream_start(self) -> int:
        """The stream position of the resumed chunk's first token (0 for a fresh split)."""
        return self._published - self.resume.skip

    def add(self, chunk: int, tokens: np.ndarray, documents: int) -> None:
        """Append chunk `chunk`'s tokens, from its `documents` documents (chunks come in order; the resumed
        chunk's first `resume.skip` tokens are already published and dropped)."""
        start = self._published + self._buffered
        if chunk == self.resume.chunk and self.resume.skip:
            tokens, start = tokens[self.resume.skip :], start - self.resume.skip
        self._starts.append((chunk, start, self._next[1]))
        self._next = (chunk + 1, self._next[1] + documents)
        self._buffer.append(tokens.astype(self.dtype, copy=False))
        self._buffered += len(tokens)
        while self._buffered >= self.shard_tokens:
            self._publish(self.shard_tokens)

    def finish(self) -> list[dict[str, Any]]:
        """Publish the remainder (whole blocks; a partial block is dropped) and return every shard's record."""
        whole = self._buffered // self.width * self.width
        if whole:
            self._publish(whole)
        return self.shards

    def _publish(self, count: int) -> None:
        stream = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        shard, rest = stream[:count], stream[count:]
        self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)
        self._published += count
        resume = self._resume_after(self._published)
        name = SHARD.format(len(self.shards))
        record = {
            "file": f"{name}.bin",
            "blocks": count // self.width,
            "dtype": self.dtype.name,
            "crc32": zlib.crc32(shard),
            "resume": resume,
        }
        write_bytes_atomically(self.directory / f"{name}.bin", np.ascontiguousarray(shard))
        write_text_atomically(self.directory / f"{name}.json", json.dumps(record))
        fsync(self.directory)
        self.shards.append(record)

    def _resume_after(self, position: int) -> dict[str, int]:
        """The chunk holding stream position `position` and how many of its tokens lie before it."""
        while len(self._starts) > 1 and self._starts[1][1] <= position:
            self._starts.pop(0)
        if not self._buffered:
            self._starts.clear()
            return {"chunk": self._next[0], "skip": 0, "documents": self._next[1]}
        chunk, start, documents = self._starts[0]
        return {"chunk": chunk, "skip": position - start, "documents": documents}


class ShardedBlocks:
    """The blocks of a split's shards as one read-only array of shape (num_blocks, width), memory-mapped.

    Supports what the loaders and baselines need: `len`, `shape`, `dtype`, and indexing by an int, a slice,
    an array of row indices, or a (rows, columns) tuple; rows are gathered shard by shard. It pickles as
    its file list (a cluster's input workers reopen the maps instead of receiving copies of the tokens).

    Raises:
        DataError: a shard that is missing, or whose size is not its blocks x width x dtype bytes (truncated,
            or written with another dtype); the message names the shard.
    """

    def __init__(self, paths: Sequence[Path], blocks: Sequence[int], width: int, dtype: np.dtype) -> None:
        self.paths, self.blocks, self.width, self.dtype = list(paths), list(blocks), width, np.dtype(dtype)
        self._maps = [self._open(path, count) for path, count in zip(self.paths, self.blocks, strict=True)]
        self._offsets = np.cumsum([0, *self.blocks])

    def _open(self, path: Path, count: int) -> np.memmap:
        expected = count * self.width * self.dtype.itemsize
        if not path.is_file():
            raise DataError(path, "shard missing; delete the corpus directory to prepare it again")
        size = path.stat().st_size
        if size != expected:
            raise DataError(
                path,
                f"{size} bytes, but its index says {count} blocks x {self.width} tokens x {self.dtype.itemsize}-byte "
                f"{self.dtype.name} = {expected}: truncated or written with another dtype; delete the corpus "
                "directory (or run `modelzoo prepare-data`) to prepare it again",
            )
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(count, self.width))

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "blocks": self.blocks, "width": self.width, "dtype": self.dtype.str}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["paths"], state["blocks"], state["width"], np.dtype(state["dtype"]))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.width

    def shards(self) -> Iterator[np.ndarray]:
        """Each shard's blocks in turn (memory maps: nothing is read until used)."""
        yield from self._maps

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = np.concatenate(self._maps) if self._maps else np.empty((0, self.width), self.dtype)
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, tuple):
            rows, columns = index[0], index[1:]
            return self[rows][(slice(None), *columns)]
        if isinstance(index, (int, np.integer)):
            position = int(index) + len(self) if index < 0 else int(index)
            shard = int(np.searchsorted(self._offsets, position, side="right")) - 1
            return np.asarray(self._maps[shard][position - self._offsets[shard]])
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        rows = np.asarray(index, dtype=np.int64)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"block index out of range for {len(self)} blocks")
        rows = np.where(rows < 0, rows + len(self), rows)
        out = np.empty((len(rows), self.width), dtype=self.dtype)
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for shard in np.unique(shard_of):
            where = shard_of == shard
            out[where] = self._maps[shard][rows[where] - self._offsets[shard]]
        return out


def open_split(directory: Path, records: Sequence[dict[str, Any]], width: int) -> ShardedBlocks:
    """The blocks of the shards `records` (a split's entries in a corpus's `meta.json`) under `directory`."""
    dtypes = {record["dtype"] for record in records}
    if len(dtypes) > 1:
        raise DataError(directory, f"shards of several dtypes ({', '.join(sorted(dtypes))}); prepare it again")
    dtype = np.dtype(dtypes.pop() if dtypes else np.uint16)
    paths = [directory / record["file"] for record in records]
    return ShardedBlocks(paths, [record["blocks"] for record in records], width, dtype)


CRC_BYTES = 1 << 24  # read in pieces of 16 MiB: a shard's checksum never holds a second copy of it in memory


def verify_shards(blocks: ShardedBlocks, records: Sequence[dict[str, Any]]) -> None:
    """Compare each shard's bytes with the CRC-32 its record holds (shards prepared before checksums: unchecked).

    About 1 GB/s on one core, so a run checks its corpus whole when it opens it.

    Raises:
        DataError: a shard changed since it was prepared, naming it.
    """
    for path, shard, record in zip(blocks.paths, blocks.shards(), records, strict=True):
        if "crc32" not in record:
            continue
        flat, crc = shard.reshape(-1).view(np.uint8), 0
        for start in range(0, len(flat), CRC_BYTES):
            crc = zlib.crc32(flat[start : start + CRC_BYTES], crc)
        if crc != record["crc32"]:
            raise DataError(
                path,
                f"checksum mismatch (CRC-32 {crc:08x}, its index says {record['crc32']:08x}): the shard changed "
                "after it was prepared; delete the corpus directory (or run `modelzoo prepare-data`) to prepare it "
                "again",
            )


def open_prepared(split_directory: str | Path, verify: bool = False) -> ShardedBlocks:
    """The blocks of one split of a complete prepared corpus (`<corpus>/<split>`, its `meta.json` beside it); with
    `verify`, each shard checked against its checksum (`verify_shards`: a run does it once, when it loads its corpus;
    a CS-2's input workers, which open the split again at every executor, do not).

    Raises:
        DataError: the corpus is not complete (no `meta.json`: still being prepared, or interrupted), or a shard is
            truncated, of another dtype or (`verify`) changed.
    """
    split_directory = Path(split_directory)
    meta_path = split_directory.parent / "meta.json"
    if not meta_path.is_file():
        raise DataError(meta_path, "missing: the corpus is not completely prepared (run `modelzoo prepare-data`)")
    meta = json.loads(meta_path.read_text())
    records = meta["splits"][split_directory.name]["records"]
    blocks = open_split(split_directory, records, meta["seq_len"] + 1)
    if verify:
        verify_shards(blocks, records)
    return blocks

"""Documents of a corpus as a stream: local text / JSON Lines files (optionally .gz, globs), or a hub dataset.

Every local line is validated on the way (UTF-8, one JSON object with a string `text_field`), so bad data
fails naming its file and line. `scan_file` checks a whole file in one pass before anything of it is
written; `split_key` identifies a split's documents (local files by content, never by path or mtime).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import datasets

from modelzoo.data.config import DataConfig
from modelzoo.errors import ConfigError, DataError

EXTENSION_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".h5": "cerebras_hdf5"}
SPLITS = ("train", "validation")
HASH_CHUNK = 1 << 20
GLOB_CHARS = "*?["


# ---- local files ---------------------------------------------------------------------------------------------


def file_format(path: str, fmt: str) -> str:
    """`fmt` unless it is "auto"; then "text", "json" or "cerebras_hdf5" from the extension (.gz is ignored)."""
    if fmt != "auto":
        return fmt
    stem = path.lower().removesuffix(".gz")
    for extension, name in EXTENSION_FORMATS.items():
        if stem.endswith(extension):
            return name
    raise ConfigError(
        "data.format",
        f"cannot tell the format of {path} from its extension ({', '.join(EXTENSION_FORMATS)}, optionally .gz); "
        "set data.format",
        ["text", "json", "cerebras_hdf5"],
    )


def expand_files(patterns: list[str]) -> list[str]:
    """`patterns` with each glob replaced by its matches and each directory (a Cerebras Model Zoo HDF5 data
    directory) by its `*.h5` files, sorted (so the order never depends on the file system). Every reader of a
    split's files (preparation, the tokenizer, a run's identity) gets them from here.

    Raises:
        DataError: a glob that matches no file, or a directory without `*.h5` files.
    """
    files = []
    for pattern in patterns:
        if any(char in pattern for char in GLOB_CHARS):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(pattern, "the glob matches no file (relative to the cwd)")
            files.extend(matches)
        elif Path(pattern).is_dir():
            found = sorted(str(p) for p in Path(pattern).glob("*.h5"))
            if not found:
                raise DataError(
                    pattern, "a directory is read as Cerebras HDF5 shards but has no *.h5 files; name files or a glob"
                )
            files.extend(found)
        else:
            files.append(pattern)
    return files


# The longest line a corpus file may hold (a document, or its JSON record): a longer one is refused naming its file
# and line before anything is read further, so no line costs more than a bounded multiple of this in memory.
MAX_LINE_BYTES = 64 << 20
# Documents longer than this are tokenised (and fed to the tokenizer trainer) in pieces of at most this many
# characters, each cut before a space where there is one: the tokens are those of the whole document (byte-level
# BPE attaches a space to the word after it) and the memory is that of one piece.
PIECE_CHARS = 1 << 16
# The tokenizer trainer's cost grows with the square of a word's length; runs of non-space characters longer than
# this are fed to it cut into pieces of this length (a 2 MB line of "a" trains in about a second).
TRAINER_WORD_CHARS = 1024
_LONG_WORD = re.compile(rf"\S{{{TRAINER_WORD_CHARS + 1},}}")


def pieces(text: str) -> Iterator[str]:
    """`text` in pieces of at most `PIECE_CHARS` characters, each cut before a space in its second half if any."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = text.rfind(" ", start + PIECE_CHARS // 2 + 1, start + PIECE_CHARS + 1)
        end = end if end > start else start + PIECE_CHARS
        yield text[start:end]
        start = end
    yield text[start:]


def trainer_pieces(text: str) -> Iterator[str]:
    """`pieces(text)`, those with a run of non-space characters longer than `TRAINER_WORD_CHARS` cut further into
    pieces of that length: what the tokenizer trainer reads of a document."""
    for piece in pieces(text):
        if _LONG_WORD.search(piece) is None:
            yield piece
        else:
            yield from (piece[i : i + TRAINER_WORD_CHARS] for i in range(0, len(piece), TRAINER_WORD_CHARS))


def require_file(path: str) -> None:
    if not Path(path).is_file():
        raise DataError(path, "no such file; check data.train_files / data.validation_files (relative to the cwd)")


def _open(path: str) -> IO[bytes]:
    require_file(path)
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _document(raw: bytes, fmt: str, text_field: str, path: str, line: int) -> str:
    """The text of one line: the line itself, or the `text_field` of its JSON object ("" when blank)."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(
            path, f"not valid UTF-8 (byte {exc.start} of the line is {raw[exc.start]:#04x}); re-encode as UTF-8", line
        ) from exc
    if fmt == "text" or not text.strip():
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"invalid JSON ({exc.msg}, column {exc.colno}); expected one object per line (JSON Lines)"
        raise DataError(path, message, line) from exc
    if not isinstance(record, dict):
        raise DataError(path, f"expected a JSON object per line, got {type(record).__name__}", line)
    if text_field not in record:
        fields = ", ".join(map(repr, record)) or "none"
        raise DataError(path, f"record has no {text_field!r} field (fields: {fields}); set data.text_field", line)
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(path, f"{text_field!r} is a JSON {type(value).__name__}, not a string", line)
    return value


def read_documents(path: str, fmt: str = "auto", text_field: str = "text") -> Iterator[str]:
    """Stream the non-blank documents of one local file, validating every line on the way.

    Args:
        path: a text file (one document per line) or JSON Lines file, optionally gzipped.
        fmt: "text", "json" or "auto" (from the extension).
        text_field: the JSON field holding the document.

    Raises:
        DataError: a missing, unreadable or empty file, a line that is not UTF-8, not a JSON object, or lacks
            a string `text_field`; the message names the file and the 1-based line.
    """
    fmt = file_format(path, fmt)
    if fmt == "cerebras_hdf5":
        raise ConfigError("data.format", f"{path} holds token blocks (cerebras_hdf5), not documents to read")
    documents = 0
    try:
        with _open(path) as f:
            for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(
                        path,
                        f"line longer than the maximum of {MAX_LINE_BYTES:,} bytes "
                        "(modelzoo.data.documents.MAX_LINE_BYTES); split the document over several lines",
                        number,
                    )
                text = _document(raw, fmt, text_field, path, number)
                if text.strip():
                    documents += 1
                    yield text
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(path, f"not a readable gzip file ({exc}); recompress it or drop the .gz suffix") from exc
    if documents == 0:
        raise DataError(path, "no documents (the file is empty or has only blank lines)")


@dataclass(frozen=True)
class FileScan:
    """One local file checked end to end: its documents and the bytes of their text."""

    path: str
    documents: int
    text_bytes: int


def scan_file(path: str, fmt: str = "auto", text_field: str = "text") -> FileScan:
    """Check every line of a local file in one streaming pass (see `read_documents`) and count its documents."""
    documents = text_bytes = 0
    for text in read_documents(path, fmt, text_field):
        documents += 1
        text_bytes += len(text.encode("utf-8"))
    return FileScan(path, documents, text_bytes)


def file_sha256(path: str) -> str:
    """sha256 of the file's bytes (as stored, so of the compressed bytes for .gz)."""
    require_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the documents of a split ----------------------------------------------------------------------------------


def held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out validation split: a hash of its text, never its position."""
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return value < fraction * 2.0**64


def split_files(cfg: DataConfig, split: str) -> list[str]:
    """The local files `split` reads ("train" or "validation"); an empty list means the hub dataset's split.

    With `validation_fraction` > 0 the validation split is held out of the training files (or hub split).

    Raises:
        ConfigError: the split has neither local files nor a hub dataset to come from, or both a
            `validation_fraction` and validation files are given.
    """
    if cfg.validation_fraction and cfg.validation_files:
        raise ConfigError(
            "data.validation_fraction",
            f"{cfg.validation_fraction} holds validation documents out of the training files, but "
            "data.validation_files are given too; keep one of the two",
        )
    if split == "validation" and cfg.validation_fraction:
        split = "train"
    files = cfg.train_files if split == "train" else cfg.validation_files
    if files or (cfg.hub_name and not cfg.train_files):
        return expand_files(list(files))
    if split == "train":
        raise ConfigError("data.train_files", "no training data: give data.train_files or data.hub_name")
    raise ConfigError(
        "data.validation_files",
        "the corpus has no validation split: give data.validation_files (held-out documents in the same format) "
        "or data.validation_fraction (e.g. 0.01)",
    )


def hub_split(cfg: DataConfig, split: str) -> str:
    return cfg.train_split if split == "train" or cfg.validation_fraction else cfg.validation_split


def split_key(cfg: DataConfig, split: str) -> dict[str, Any]:
    """What identifies the documents of `split`: local files by content, a hub dataset by its coordinates.

    Hub datasets are identified by name, config, revision and split only: pin `data.hub_revision` so that
    an upstream change cannot hide behind a cached fingerprint.
    """
    files = split_files(cfg, split)
    held = {"held_out": [cfg.validation_fraction, split]} if cfg.validation_fraction else {}
    if files:
        keys = []
        for path in files:
            fmt = file_format(path, cfg.format)
            keys.append([file_sha256(path), fmt, cfg.text_field if fmt == "json" else None])
        return {"files": keys, **held}
    hub = [cfg.hub_name, cfg.hub_config, cfg.hub_revision, hub_split(cfg, split)]
    return {"hub": hub, "field": cfg.text_field, **held}


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Stream the non-blank documents of `split` (local files validated line by line, see `read_documents`).

    A held-out split (`validation_fraction`) keeps the documents `held_out` picks; the training split the rest.
    """
    files = split_files(cfg, split)
    stream = (text for path in files for text in read_documents(path, cfg.format, cfg.text_field))
    if not files:
        stream = iter_hub(cfg, split)
    if not cfg.validation_fraction:
        yield from stream
        return
    keep = split == "validation"
    yield from (text for text in stream if held_out(text, cfg.validation_fraction) == keep)


def iter_hub(cfg: DataConfig, split: str) -> Iterator[str]:
    """The non-blank `text_field` values of one split of `cfg.hub_name`, streamed (nothing downloaded whole)."""
    name = hub_split(cfg, split)
    try:
        dataset = datasets.load_dataset(
            cfg.hub_name, cfg.hub_config, revision=cfg.hub_revision, split=name, streaming=True
        )
        for row, record in enumerate(dataset):
            if cfg.text_field not in record:
                raise ConfigError(
                    "data.text_field", f"{cfg.hub_name}[{name}] row {row} has no column {cfg.text_field!r}", record
                )
            text = record[cfg.text_field]
            if text and text.strip():
                yield text
    except ConfigError:
        raise
    except ValueError as exc:
        if "split" not in str(exc).lower():
            raise _hub_error(cfg, exc) from exc
        key = "data.train_split" if split == "train" else "data.validation_split"
        message = f"{cfg.hub_name} has no split {name!r} ({describe_error(exc)}); pick one of its splits"
        raise ConfigError(key, f"{message} or give data.{split}_files") from exc
    except OSError as exc:  # DatasetNotFoundError and connection errors included
        raise _hub_error(cfg, exc) from exc


def describe_error(exc: Exception) -> str:
    """`Type: message` on one line (library errors often span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _hub_error(cfg: DataConfig, exc: Exception) -> ConfigError:
    return ConfigError(
        "data.hub_name",
        f"cannot load {cfg.hub_name!r} from the Hugging Face hub ({describe_error(exc)}); offline (HF_HUB_OFFLINE=1) "
        "it must already be in the HF datasets cache, or use local files (data.train_files)",
    )

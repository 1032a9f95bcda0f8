"""Pre-training corpora: validated documents, tokenised, joined with EOS and packed into fixed-size blocks.

`load_corpus` turns a `DataConfig` into two arrays of shape (num_blocks, seq_len + 1): inputs are
`block[:, :-1]`, targets `block[:, 1:]`. Local files (text or JSON Lines, optionally gzipped) are checked
line by line before `datasets` reads them, so bad data fails with its file and line. The packed arrays
are cached under `<cache_dir>/corpus/<fingerprint>/`; the fingerprint covers everything that changes them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerFast

from modelzoo.data.config import DataConfig
from modelzoo.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Bump when the packing or the cache layout changes, so old caches are not reused.
FORMAT_VERSION = 1
EXTENSION_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json"}
SPLITS = ("train", "validation")
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackedCorpus:
    """Token blocks of both splits, each row `seq_len + 1` tokens (inputs and shifted targets).

    `*_tokens` count the tokenised documents with their EOS, before the remainder that fills no
    whole block was dropped.
    """

    train: np.ndarray
    validation: np.ndarray
    fingerprint: str
    train_tokens: int
    validation_tokens: int


# ---- reading and validating local files -----------------------------------------------------------------


def file_format(path: str, fmt: str) -> str:
    """`fmt` unless it is "auto"; then "text" or "json" from the extension (a trailing .gz is ignored)."""
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
        ["text", "json"],
    )


def _require_file(path: str) -> None:
    if not Path(path).is_file():
        raise DataError(path, "no such file; check data.train_files / data.validation_files (relative to the cwd)")


def _open(path: str) -> IO[bytes]:
    _require_file(path)
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
    documents = 0
    try:
        with _open(path) as lines:
            for number, raw in enumerate(lines, start=1):
                text = _document(raw, fmt, text_field, path, number)
                if text.strip():
                    documents += 1
                    yield text
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(path, f"not a readable gzip file ({exc}); recompress it or drop the .gz suffix") from exc
    if documents == 0:
        raise DataError(path, "no documents (the file is empty or has only blank lines)")


def validate_file(path: str, fmt: str = "auto", text_field: str = "text") -> int:
    """Check a local file in one streaming pass (see `read_documents`) and return its number of documents."""
    return sum(1 for _ in read_documents(path, fmt, text_field))


def file_sha256(path: str) -> str:
    """sha256 of the file's bytes (as stored, so of the compressed bytes for .gz)."""
    _require_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the documents of a split: local files or a hub dataset ---------------------------------------------


def split_files(cfg: DataConfig, split: str) -> list[str]:
    """The local files of `split` ("train" or "validation"); an empty list means the hub dataset's split.

    Raises:
        ConfigError: the split has neither local files nor a hub dataset to come from.
    """
    files = cfg.train_files if split == "train" else cfg.validation_files
    if files or (cfg.hub_name and not cfg.train_files):
        return list(files)
    if split == "train":
        raise ConfigError("data.train_files", "no training data: give data.train_files or data.hub_name")
    raise ConfigError(
        "data.validation_files",
        "the corpus has no validation split: give data.validation_files (held-out documents in the same format)",
    )


def split_key(cfg: DataConfig, split: str) -> dict[str, Any]:
    """What identifies the documents of `split`: local files by content, a hub dataset by its coordinates.

    Hub datasets are identified by name, config, revision and split only: pin `data.hub_revision` so that
    an upstream change cannot hide behind a cached fingerprint.
    """
    files = split_files(cfg, split)
    if files:
        keys = []
        for path in files:
            fmt = file_format(path, cfg.format)
            keys.append([file_sha256(path), fmt, cfg.text_field if fmt == "json" else None])
        return {"files": keys}
    return {"hub": [cfg.hub_name, cfg.hub_config, cfg.hub_revision, _hub_split(cfg, split)], "field": cfg.text_field}


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """Stream the non-blank documents of `split`, local files validated line by line (see `read_documents`)."""
    files = split_files(cfg, split)
    for path in files:
        yield from read_documents(path, cfg.format, cfg.text_field)
    if not files:
        dataset = _load_hub(cfg, split)
        for batch in dataset.iter(batch_size=1000):
            yield from (text for text in batch[cfg.text_field] if text and text.strip())


def _hub_split(cfg: DataConfig, split: str) -> str:
    return cfg.train_split if split == "train" else cfg.validation_split


def _load_hub(cfg: DataConfig, split: str) -> datasets.Dataset:
    """One split of `cfg.hub_name` (network, or the local HF datasets cache), with `text_field` checked."""
    name = _hub_split(cfg, split)
    try:
        dataset = datasets.load_dataset(cfg.hub_name, cfg.hub_config, revision=cfg.hub_revision, split=name)
    except ValueError as exc:
        if "split" not in str(exc).lower():
            raise _hub_error(cfg, exc) from exc
        key = "data.train_split" if split == "train" else "data.validation_split"
        message = f"{cfg.hub_name} has no split {name!r} ({describe_error(exc)}); pick one of its splits"
        raise ConfigError(key, f"{message} or give data.{split}_files") from exc
    except OSError as exc:  # DatasetNotFoundError and connection errors included
        raise _hub_error(cfg, exc) from exc
    if cfg.text_field not in dataset.column_names:
        raise ConfigError("data.text_field", f"{cfg.hub_name} has no column {cfg.text_field!r}", dataset.column_names)
    return dataset


def describe_error(exc: Exception) -> str:
    """`Type: message` on one line (library errors often span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _hub_error(cfg: DataConfig, exc: Exception) -> ConfigError:
    return ConfigError(
        "data.hub_name",
        f"cannot load {cfg.hub_name!r} from the Hugging Face hub ({describe_error(exc)}); offline (HF_HUB_OFFLINE=1) "
        "it must already be in the HF datasets cache, or use local files (data.train_files)",
    )


def _load_split(cfg: DataConfig, split: str) -> tuple[datasets.Dataset, str]:
    """`split` as a `datasets.Dataset` and the name of its text column (local files validated first)."""
    files = split_files(cfg, split)
    if not files:
        return _load_hub(cfg, split), cfg.text_field
    formats = {file_format(path, cfg.format) for path in files}
    if len(formats) > 1:
        raise ConfigError("data.format", f"data.{split}_files mix formats ({', '.join(sorted(formats))})")
    for path in files:
        validate_file(path, cfg.format, cfg.text_field)
    fmt = formats.pop()
    cache = str(Path(cfg.cache_dir) / "datasets")
    dataset = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache)
    return dataset, "text" if fmt == "text" else cfg.text_field


# ---- tokenising, packing, caching ---------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def corpus_fingerprint(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of everything the packed blocks depend on: documents, tokenizer, EOS id, seq_len, version."""
    key = {
        "version": FORMAT_VERSION,
        "splits": {split: split_key(cfg, split) for split in SPLITS},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos": tokenizer.eos_token_id,
        "seq_len": cfg.seq_len,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the memory and disk of int32), else int32."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32)


def _tokenize(cfg: DataConfig, split: str, tokenizer: PreTrainedTokenizerFast, fingerprint: str) -> np.ndarray:
    """All documents of `split` as one token stream, EOS after every document."""
    dataset, column = _load_split(cfg, split)
    backend, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id

    def encode(batch: dict[str, list[str | None]]) -> dict[str, list[list[int]]]:
        texts = [text for text in batch[column] if text and text.strip()]
        return {"ids": [[*e.ids, eos] for e in backend.encode_batch(texts, add_special_tokens=False)]}

    encoded = dataset.map(
        encode,
        batched=True,
        num_proc=1,
        remove_columns=dataset.column_names,
        new_fingerprint=f"modelzoo-{fingerprint[:32]}-{split}",
        desc=f"Tokenising {split}",
    )
    chunks = [chunk.flatten().to_numpy() for chunk in encoded.data.column("ids").chunks]
    return np.concatenate(chunks).astype(token_dtype(len(tokenizer)))


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping blocks of `seq_len + 1` tokens, shape (len(tokens) // (seq_len + 1), seq_len + 1)."""
    block = seq_len + 1
    count = len(tokens) // block
    return tokens[: count * block].reshape(count, block)


def _pack_split(cfg: DataConfig, split: str, tokens: np.ndarray) -> np.ndarray:
    blocks = pack(tokens, cfg.seq_len)
    if len(blocks) == 0:
        where = ", ".join(split_files(cfg, split)) or f"{cfg.hub_name}[{_hub_split(cfg, split)}]"
        raise DataError(
            where, f"{len(tokens)} tokens fill no block of data.seq_len + 1 = {cfg.seq_len + 1}; add documents"
        )
    return blocks


def cache_directory(cfg: DataConfig, fingerprint: str) -> Path:
    return Path(cfg.cache_dir) / "corpus" / fingerprint


def corpus_files(cfg: DataConfig, corpus: PackedCorpus) -> tuple[Path, Path]:
    """The cache files of `corpus`'s train and validation blocks (written by `load_corpus`)."""
    directory = cache_directory(cfg, corpus.fingerprint)
    return directory / "train.npy", directory / "validation.npy"


def _read_cache(directory: Path) -> PackedCorpus | None:
    if not (directory / "meta.json").is_file():
        return None
    meta = json.loads((directory / "meta.json").read_text())
    return PackedCorpus(
        train=np.load(directory / "train.npy", mmap_mode="r"),
        validation=np.load(directory / "validation.npy", mmap_mode="r"),
        fingerprint=meta["fingerprint"],
        train_tokens=meta["train_tokens"],
        validation_tokens=meta["validation_tokens"],
    )


def _write_cache(directory: Path, corpus: PackedCorpus, meta: dict[str, Any]) -> None:
    """Write into a fresh temporary directory and rename it into place: readers see all of it or nothing."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        np.save(tmp / "train.npy", corpus.train)
        np.save(tmp / "validation.npy", corpus.validation)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, directory)
    except OSError:
        if not (directory / "meta.json").is_file():
            raise
        log.info("corpus cache %s was written by another process meanwhile", directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_corpus(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> PackedCorpus:
    """Tokenise and pack both splits of `cfg`, or load them from the cache when nothing changed.

    Args:
        cfg: the corpus (local files or hub dataset), `seq_len` and `cache_dir`.
        tokenizer: a fast tokenizer with an EOS token (appended after every document).

    Returns:
        The packed blocks, dtype uint16 when the vocabulary fits, else int32.

    Raises:
        DataError: bad data, named by file and line (see `read_documents`), or a split too short for a block.
        ConfigError: no validation split, an unknown format, or a hub dataset that cannot be loaded.
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer.path", "the tokenizer has no EOS token, which separates documents")
    fingerprint = corpus_fingerprint(cfg, tokenizer)
    directory = cache_directory(cfg, fingerprint)
    cached = _read_cache(directory)
    if cached is not None:
        log.info("corpus: cache hit %s", directory)
        return cached
    tokens = {split: _tokenize(cfg, split, tokenizer, fingerprint) for split in SPLITS}
    corpus = PackedCorpus(
        train=_pack_split(cfg, "train", tokens["train"]),
        validation=_pack_split(cfg, "validation", tokens["validation"]),
        fingerprint=fingerprint,
        train_tokens=len(tokens["train"]),
        validation_tokens=len(tokens["validation"]),
    )
    meta = {
        "fingerprint": fingerprint,
        "format_version": FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "dtype": str(corpus.train.dtype),
        "train_blocks": len(corpus.train),
        "validation_blocks": len(corpus.validation),
        "train_tokens": corpus.train_tokens,
        "validation_tokens": corpus.validation_tokens,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": {split: split_files(cfg, split) or cfg.hub_name for split in SPLITS},
    }
    _write_cache(directory, corpus, meta)
    log.info("corpus: wrote %s (%d train / %d validation blocks)", directory, len(corpus.train), len(corpus.validation))
    return corpus


def unigram_loss(train: np.ndarray, validation: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation targets under the training targets' unigram distribution.

    The distribution is add-one smoothed over `vocab_size` ids, so unseen tokens cost a finite amount.
    A language model that has learned anything beats this baseline.

    Args:
        train: blocks of shape (n, seq_len + 1); their targets `[:, 1:]` give the counts.
        validation: blocks of the same width; their targets are scored.
        vocab_size: the number of ids (every id in both arrays must be below it).
    """
    counts = np.bincount(np.asarray(train[:, 1:]).ravel(), minlength=vocab_size)
    scored = np.bincount(np.asarray(validation[:, 1:]).ravel(), minlength=vocab_size)
    if len(counts) > vocab_size or len(scored) > vocab_size:
        raise ValueError(f"token ids reach {max(len(counts), len(scored)) - 1}, beyond vocab_size={vocab_size}")
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(-(scored * log_probs).sum() / scored.sum())

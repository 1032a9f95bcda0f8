"""Corpus preparation: documents streamed, tokenised in parallel, packed and written as shards as it goes.

`prepare_source` turns one corpus (a `DataConfig` without `sources`) into a directory
`<cache_dir>/corpus/<fingerprint>/` holding `train/` and `validation/` shards (see `modelzoo.data.shards`)
and, once both splits are complete, `meta.json`; only a directory with `meta.json` is ever read. The
fingerprint covers everything the blocks depend on (documents by content, tokenizer, EOS, seq_len,
shard size, held-out fraction), so the same inputs always give the same cache. Local files are checked
line by line (in the worker pool) before any shard is written, so a malformed line stops the run
naming its file and line with nothing published. Documents go to the workers in fixed chunks of
`CHUNK_DOCS` and come back in order: the shards are byte-identical whatever `data.num_workers` is, and
a killed preparation continues after its last published shard.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from modelzoo.atomic import write_text_atomically
from modelzoo.data import cerebras_hdf5
from modelzoo.data.config import DataConfig
from modelzoo.data.documents import (
    SPLITS,
    file_format,
    held_out,
    iter_documents,
    scan_file,
    split_files,
    split_key,
)
from modelzoo.data.shards import ShardWriter, token_dtype
from modelzoo.data.workers import Workers, default_workers, encode_chunk
from modelzoo.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# Bump when the packing or the cache layout changes, so old caches are not reused.
FORMAT_VERSION = 2
CHUNK_DOCS = 256
ESTIMATE_DOCS = 512


@dataclass
class SplitReport:
    """What a split holds: documents (or Cerebras samples) read, tokens with their EOS, whole blocks, files."""

    documents: int
    tokens: int
    blocks: int
    shards: int
    bytes: int


@dataclass
class PrepareReport:
    """A corpus's splits, and what this run did: `seconds` it took and the `new_tokens` it tokenised itself (fewer
    than the splits hold when it continued a killed preparation, 0 on a cache hit)."""

    name: str
    directory: str
    fingerprint: str
    splits: dict[str, SplitReport]
    seconds: float
    cached: bool
    new_tokens: int = 0

    def format(self) -> str:
        state = "cached" if self.cached else f"prepared in {self.seconds:.1f} s"
        lines = [f"corpus {self.name}: {self.directory} ({state})"]
        for split, r in self.splits.items():
            lines.append(
                f"  {split:<10} {r.documents:,} documents, {r.tokens:,} tokens, {r.blocks:,} blocks in {r.shards} "
                f"shard(s), {r.bytes / 1e6:,.1f} MB"
            )
        if not self.cached and self.seconds:
            earlier = sum(r.tokens for r in self.splits.values()) - self.new_tokens
            resumed = f" (continuing a preparation that had done {earlier:,})" if earlier else ""
            lines.append(
                f"  {self.new_tokens:,} tokens tokenised by this run in {self.seconds:.1f} s: "
                f"{self.new_tokens / self.seconds:,.0f} tokens/s{resumed}"
            )
        return "\n".join(lines)


# ---- identity ---------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def corpus_fingerprint(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of everything a corpus's shards depend on: documents, tokenizer, EOS, seq_len, layout."""
    key = {
        "version": FORMAT_VERSION,
        "splits": {split: split_key(cfg, split) for split in SPLITS},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos": tokenizer.eos_token_id,
        "seq_len": cfg.seq_len,
        "shard_blocks": cfg.shard_blocks,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def corpus_directory(cfg: DataConfig, fingerprint: str) -> Path:
    return Path(cfg.cache_dir) / "corpus" / fingerprint


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The `meta.json` of a complete corpus directory, or None while it is absent or being prepared."""
    path = directory / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _is_hdf5(cfg: DataConfig) -> bool:
    formats = {file_format(path, cfg.format) for split in SPLITS for path in split_files(cfg, split)}
    if "cerebras_hdf5" in formats and len(formats) > 1:
        raise ConfigError("data.format", f"{cfg.name} mixes Cerebras HDF5 shards with documents; keep one per source")
    return formats == {"cerebras_hdf5"}


# ---- preparing ----------------------------------------------------------------------------------------------------


def prepare_source(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerFast, progress: bool | None = None
) -> tuple[PrepareReport, dict[str, Any]]:
    """Prepare one corpus (or find it in the cache); return its report and its `meta.json`.

    Args:
        cfg: one corpus (no `sources`).
        tokenizer: a fast tokenizer with an EOS token (appended after every document).
        progress: show progress bars (default: when stderr is a terminal).

    Raises:
        DataError: bad data, named by file and line, or a split too short for a block.
        ConfigError: no validation split, an unknown format, or a hub dataset that cannot be loaded.
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer.path", "the tokenizer has no EOS token, which separates documents")
    started = time.perf_counter()
    fingerprint = corpus_fingerprint(cfg, tokenizer)
    directory = corpus_directory(cfg, fingerprint)
    meta = read_meta(directory)
    if meta is not None:
        log.info("corpus %s: cache hit %s", cfg.name, directory)
        return _report(cfg, directory, meta, 0.0, cached=True), meta
    progress = sys.stderr.isatty() if progress is None else progress
    dtype = token_dtype(len(tokenizer))
    workers = cfg.num_workers or default_workers()
    hdf5 = _is_hdf5(cfg)
    backend = tokenizer.backend_tokenizer.to_str()
    with Workers(1 if hdf5 else workers, backend, tokenizer.eos_token_id, dtype) as pool:
        totals = _check_files(cfg, pool, hdf5, tokenizer, progress)
        splits, new_tokens = {}, 0
        for split in SPLITS:
            report, records, tokenised = _prepare_split(
                cfg, split, directory, pool, dtype, len(tokenizer), totals, hdf5, progress
            )
            splits[split], new_tokens = (report, records), new_tokens + tokenised
    meta = {
        "fingerprint": fingerprint,
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "seq_len": cfg.seq_len,
        "dtype": dtype.name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": {split: split_files(cfg, split) or cfg.hub_name for split in SPLITS},
        "splits": {split: {**asdict(r), "records": records} for split, (r, records) in splits.items()},
    }
    write_text_atomically(directory / "meta.json", json.dumps(meta))
    report = _report(cfg, directory, meta, time.perf_counter() - started, cached=False, new_tokens=new_tokens)
    log.info("%s", report.format())
    return report, meta


def _report(
    cfg: DataConfig, directory: Path, meta: dict[str, Any], seconds: float, cached: bool, new_tokens: int = 0
) -> PrepareReport:
    splits = {
        split: SplitReport(**{k: v for k, v in entry.items() if k != "records"})
        for split, entry in meta["splits"].items()
    }
    return PrepareReport(cfg.name, str(directory), meta["fingerprint"], splits, seconds, cached, new_tokens)


def _check_files(
    cfg: DataConfig, pool: Workers, hdf5: bool, tokenizer: PreTrainedTokenizerFast, progress: bool
) -> dict[str, int | None]:
    """Every local file checked end to end before any shard is written; the documents expected per split."""
    totals: dict[str, int | None] = {}
    for split in SPLITS:
        files = split_files(cfg, split)
        if not files:
            totals[split] = None
            continue
        if hdf5:
            _check_tokenizer(cfg, files, tokenizer)
            totals[split] = sum(cerebras_hdf5.check_file(path, cfg.seq_len) for path in files)
            continue
        scan = partial(scan_file, fmt=cfg.format, text_field=cfg.text_field)
        bar = tqdm(total=len(files), desc=f"checking {cfg.name} {split}", unit="file", disable=not progress)
        with bar:
            documents = 0
            for result in pool.ordered_map(scan, files):
                documents += result.documents
                bar.update(1)
        totals[split] = None if cfg.validation_fraction else documents
    return totals


def _check_tokenizer(cfg: DataConfig, files: list[str], tokenizer: PreTrainedTokenizerFast) -> None:
    ours = f"modelzoo_tokenizer_sha256={tokenizer_fingerprint(tokenizer)}"
    for path in files:
        declared = cerebras_hdf5.declared_tokenizer(path)
        if declared and declared.startswith("modelzoo_") and declared != ours:
            raise DataError(
                Path(path).parent / cerebras_hdf5.PARAMS,
                f"source {cfg.name} was tokenised with another tokenizer ({declared}) than this run's ({ours}); "
                "train with the tokenizer it was written with (tokenizer.path)",
            )


def _encode_item(item: tuple[int, list[str]]) -> tuple[int, int, np.ndarray]:
    index, texts = item
    return index, len(texts), encode_chunk(texts)


def _document_chunks(cfg: DataConfig, split: str, first: int) -> Iterator[tuple[int, list[str]]]:
    """(index, documents) chunks of `CHUNK_DOCS`, from chunk `first` on (earlier ones are read, not kept)."""
    documents = iter_documents(cfg, split)
    for index in itertools.count():
        chunk = list(itertools.islice(documents, CHUNK_DOCS))
        if not chunk:
            return
        if index >= first:
            yield index, chunk


def _hdf5_chunks(cfg: DataConfig, split: str, first: int, vocab_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(index, samples, tokens) chunks of a Cerebras source: `READ_ROWS` samples of one file each."""
    index = 0
    for path in split_files(cfg, split):
        for blocks in cerebras_hdf5.read_blocks(path, cfg.seq_len, vocab_size):
            if cfg.validation_fraction:
                keep = split == "validation"
                chosen = [held_out(row.tobytes().hex(), cfg.validation_fraction) == keep for row in blocks]
                blocks = blocks[np.array(chosen, dtype=bool)]
            if index >= first:
                yield index, len(blocks), blocks.ravel()
            index += 1


def _prepare_split(
    cfg: DataConfig,
    split: str,
    directory: Path,
    pool: Workers,
    dtype: np.dtype,
    vocab_size: int,
    totals: dict[str, int | None],
    hdf5: bool,
    progress: bool,
) -> tuple[SplitReport, list[dict[str, Any]], int]:
    """One split's shards (continuing after those a killed run published); its report, its shard records and the
    tokens this call tokenised (those of the chunks it did not find published)."""
    done = directory / f"{split}.json"
    if done.is_file():
        entry = json.loads(done.read_text())
        return SplitReport(**entry["report"]), entry["records"], 0
    width = cfg.seq_len + 1
    writer = ShardWriter(directory / split, width, dtype, cfg.shard_blocks)
    first = writer.resume.chunk
    if hdf5:
        results = _hdf5_chunks(cfg, split, first, vocab_size)
    else:
        results = pool.ordered_map(_encode_item, _document_chunks(cfg, split, first))
    documents, tokens = writer.resume.documents, writer.stream_start
    unit = "sample" if hdf5 else "doc"
    refresh = 0.1 if sys.stderr.isatty() else 30.0
    bar = tqdm(
        total=totals[split],
        initial=documents,
        desc=f"{cfg.name} {split}",
        unit=unit,
        unit_scale=True,
        mininterval=refresh,
        disable=not progress,
    )
    started, new_tokens = time.perf_counter(), 0
    with bar:
        for index, count, chunk_tokens in results:
            writer.add(index, chunk_tokens, count)
            documents, tokens, new_tokens = (
                documents + count,
                tokens + len(chunk_tokens),
                new_tokens + len(chunk_tokens),
            )
            bar.update(count)
            bar.set_postfix(refresh=False, tok_s=f"{new_tokens / max(time.perf_counter() - started, 1e-9):,.0f}")
    records = writer.finish()
    blocks = sum(record["blocks"] for record in records)
    if blocks == 0:
        where = ", ".join(split_files(cfg, split)) or f"{cfg.hub_name}[{split}]"
        raise DataError(where, f"{tokens} tokens fill no block of data.seq_len + 1 = {width}; add documents")
    report = SplitReport(documents, tokens, blocks, len(records), blocks * width * np.dtype(dtype).itemsize)
    write_text_atomically(done, json.dumps({"report": asdict(report), "records": records}))
    return report, records, new_tokens


# ---- estimating -----------------------------------------------------------------------------------------------


def estimate(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> str:
    """`prepare-data --dry-run`: the documents and bytes of the inputs, and the tokens and shard bytes they
    will give, from the tokens per byte of the first `ESTIMATE_DOCS` training documents. Writes nothing."""
    dtype = token_dtype(len(tokenizer))
    sample = list(itertools.islice(iter_documents(cfg, "train"), ESTIMATE_DOCS))
    with Workers(1, tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id, dtype):
        sample_tokens = len(encode_chunk(sample))
    per_byte = sample_tokens / max(sum(len(text.encode("utf-8")) for text in sample), 1)
    lines = [
        f"corpus {cfg.name}: {sample_tokens / max(len(sample), 1):,.1f} tokens per document "
        f"({per_byte:.3f} per byte) in its first {len(sample)} training documents"
    ]
    for split in SPLITS:
        files = split_files(cfg, split)
        if not files:
            lines.append(f"  {split:<10} a streamed hub dataset: its size is unknown until it is read")
            continue
        scans = [scan_file(path, cfg.format, cfg.text_field) for path in files]
        documents, text_bytes = sum(s.documents for s in scans), sum(s.text_bytes for s in scans)
        share = 1.0
        if cfg.validation_fraction:
            share = cfg.validation_fraction if split == "validation" else 1 - cfg.validation_fraction
        tokens = share * (text_bytes * per_byte)
        blocks = int(tokens // (cfg.seq_len + 1))
        shards = max(1, -(-blocks // cfg.shard_blocks))
        lines.append(
            f"  {split:<10} {len(files)} file(s), ~{share * documents:,.0f} documents, "
            f"~{share * text_bytes / 1e6:,.1f} "
            f"MB of text -> ~{tokens:,.0f} tokens, ~{blocks:,} blocks, ~{shards} shard(s), "
            f"~{blocks * (cfg.seq_len + 1) * dtype.itemsize / 1e6:,.1f} MB ({dtype.name})"
        )
    return "\n".join(lines)

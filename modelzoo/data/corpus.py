"""Pre-training corpora as memory-mapped token blocks: one source, or a weighted mixture of sources.

`load_corpus` prepares every source once (`modelzoo.data.prepare`; a cache hit when its fingerprint is
already complete on disk) and opens its shards: blocks of `seq_len + 1` tokens, inputs `block[:-1]`,
targets `block[1:]`, never loaded whole into memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

from modelzoo.data.cerebras_hdf5 import declared_tokenizer
from modelzoo.data.config import DataConfig, resolve_sources
from modelzoo.data.documents import SPLITS, file_format, split_files
from modelzoo.data.prepare import PrepareReport, prepare_source
from modelzoo.data.shards import ShardedBlocks, open_prepared
from modelzoo.errors import ConfigError


@dataclass(frozen=True)
class Source:
    """One prepared corpus of a run: its name, sampling weight and blocks."""

    name: str
    weight: float
    train: ShardedBlocks
    validation: ShardedBlocks
    report: PrepareReport


@dataclass(frozen=True)
class PackedCorpus:
    """The sources of a run; `train` / `validation` are all sources' blocks end to end (for baselines and
    evaluation); the training loader draws from `sources` by weight.

    `*_tokens` count the tokenised documents with their EOS, before the remainder that fills no whole
    block was dropped.
    """

    sources: list[Source]
    train: ShardedBlocks
    validation: ShardedBlocks
    fingerprint: str
    train_tokens: int
    validation_tokens: int


def _check_mixture(sources: list[DataConfig]) -> None:
    """Cerebras sources that name their tokenizer must name the same one (ours are checked by sha256)."""
    declared = {}
    for i, cfg in enumerate(sources):
        for path in split_files(cfg, "train"):
            if file_format(path, cfg.format) == "cerebras_hdf5" and declared_tokenizer(path):
                declared[i] = declared_tokenizer(path)
                break
    if len(set(declared.values())) > 1:
        names = "; ".join(f"{sources[i].name}: {name}" for i, name in declared.items())
        first_other = sorted(declared)[-1]
        raise ConfigError(
            f"data.sources[{first_other}]", f"the sources were tokenised with different tokenizers ({names})"
        )


def load_corpus(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast, progress: bool | None = None) -> PackedCorpus:
    """Prepare (or find in the cache) every source of `cfg` and open its shards.

    Args:
        cfg: the corpus: local files, a hub dataset, or `sources` (a mixture).
        tokenizer: a fast tokenizer with an EOS token (appended after every document).
        progress: progress bars while preparing (default: when stderr is a terminal).

    Raises:
        DataError: bad data, named by file and line (see `modelzoo.data.documents`), a split too short for a
            block, or a shard that is truncated or of another dtype, named by its path.
        ConfigError: no validation split, an unknown format, a hub dataset that cannot be loaded, or a mixture
            whose sources cannot share one run (weights, seq_len, tokenizers), named by key.
    """
    resolved = resolve_sources(cfg)
    _check_mixture([source for source, _ in resolved])
    sources = []
    for source_cfg, weight in resolved:
        report, _ = prepare_source(source_cfg, tokenizer, progress)
        splits = {split: open_prepared(Path(report.directory) / split, verify=True) for split in SPLITS}
        sources.append(Source(source_cfg.name, weight, splits["train"], splits["validation"], report))
    fingerprint = sources[0].report.fingerprint
    if len(sources) > 1:
        key = [[s.name, s.weight, s.report.fingerprint] for s in sources]
        fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    return PackedCorpus(
        sources=sources,
        train=_joined([s.train for s in sources]),
        validation=_joined([s.validation for s in sources]),
        fingerprint=fingerprint,
        train_tokens=sum(s.report.splits["train"].tokens for s in sources),
        validation_tokens=sum(s.report.splits["validation"].tokens for s in sources),
    )


def _joined(parts: list[ShardedBlocks]) -> ShardedBlocks:
    if len(parts) == 1:
        return parts[0]
    return ShardedBlocks(
        [p for part in parts for p in part.paths],
        [b for part in parts for b in part.blocks],
        parts[0].width,
        parts[0].dtype,
    )


def unigram_loss(train: ShardedBlocks | np.ndarray, validation: ShardedBlocks | np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation targets under the training targets' unigram distribution.

    The distribution is add-one smoothed over `vocab_size` ids, so unseen tokens cost a finite amount.
    A language model that has learned anything beats this baseline. Counted shard by shard.

    Args:
        train: blocks of shape (n, seq_len + 1); their targets `[:, 1:]` give the counts.
        validation: blocks of the same width; their targets are scored.
        vocab_size: the number of ids (every id in both arrays must be below it).
    """
    counts, scored = _target_counts(train), _target_counts(validation)
    if len(counts) > vocab_size or len(scored) > vocab_size:
        raise ValueError(f"token ids reach {max(len(counts), len(scored)) - 1}, beyond vocab_size={vocab_size}")
    counts = np.pad(counts, (0, vocab_size - len(counts)))
    scored = np.pad(scored, (0, vocab_size - len(scored)))
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(-(scored * log_probs).sum() / scored.sum())


def _target_counts(blocks: ShardedBlocks | np.ndarray) -> np.ndarray:
    parts = blocks.shards() if isinstance(blocks, ShardedBlocks) else [blocks]
    total = np.zeros(0, dtype=np.int64)
    for part in parts:
        counts = np.bincount(np.asarray(part[:, 1:]).ravel())
        size = max(len(total), len(counts))
        total = np.pad(total, (0, size - len(total))) + np.pad(counts, (0, size - len(counts)))
    return total


def corpus_files(corpus: PackedCorpus) -> tuple[Path, Path]:
    """The prepared train and validation split directories of a one-source corpus, absolute (`data.cache_dir` is
    relative by default): what a CS-2's input workers read (`modelzoo.data.csx_input.read_blocks`) from a mounted
    volume, in a working directory of their own.

    Raises:
        ConfigError: a mixture (the input workers read one corpus).
    """
    if len(corpus.sources) != 1:
        raise ConfigError("data.sources", "a CS-2 run reads one prepared corpus; mixtures train with masked_dense")
    directory = Path(corpus.sources[0].report.directory).resolve()
    return directory / "train", directory / "validation"

"""Tokenizers: a byte-level BPE trained on the corpus (cached by a fingerprint), or a pretrained one by path.

The trained tokenizer follows GPT-2: byte-level pre-tokenisation without a prefix space, so any text
round-trips, and a single special token `<|endoftext|>` (id 0) serving as EOS, BOS, UNK and padding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from modelzoo.data.config import DataConfig, TokenizerConfig, resolve_sources
from modelzoo.data.documents import (
    describe_error,
    file_format,
    iter_documents,
    scan_file,
    split_files,
    split_key,
    trainer_pieces,
)
from modelzoo.errors import ConfigError

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what `save_pretrained` writes for a fast tokenizer

# Bump when the trained tokenizer's recipe changes, so old caches are not reused.
FORMAT_VERSION = 1
EOS = "<|endoftext|>"
# GPT-2 has no token types: without this, transformers 4.x tokenizers also return `token_type_ids`, which
# GPT2LMHeadModel adds as (word) embeddings, changing the logits (HF's own GPT-2 tokenizer declares the same).
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
MIN_VOCAB = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # 256 bytes + EOS


def build_tokenizer(cfg: TokenizerConfig, data: DataConfig) -> PreTrainedTokenizerFast:
    """The tokenizer of a run: loaded from `cfg.path`; else the one saved beside `data`'s Cerebras HDF5 shards
    (`bundled_tokenizer_of`); else trained on `data`'s training split.

    Args:
        cfg: `path` (None, a local directory or a hub name), `vocab_size` and `min_frequency` for training.
        data: the corpus to train on (its `train` split) and the `cache_dir` holding trained tokenizers.

    Raises:
        ConfigError: a vocabulary too small for the byte alphabet, or a `tokenizer.path` that cannot be loaded.
        DataError: bad training data, named by file and line.
    """
    if cfg.path is not None:
        return load_pretrained(cfg.path)
    bundled = bundled_tokenizer_of(data)
    if bundled is not None:
        log.info("tokenizer: the one saved beside the Cerebras HDF5 shards, %s", bundled)
        return load_pretrained(str(bundled))
    path = Path(data.cache_dir) / "tokenizers" / training_fingerprint(cfg, data) / "tokenizer.json"
    if path.is_file():
        log.info("tokenizer: cache hit %s", path)
    else:
        _write_atomic(path, train_bpe(cfg, data).to_str())
        log.info("tokenizer: trained a %d-token BPE, saved to %s", cfg.vocab_size, path)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_input_names=MODEL_INPUT_NAMES,
    )


def bundled_tokenizer_of(data: DataConfig) -> Path | None:
    """The tokenizer directory `prepare-data --cerebras-hdf5` saved beside the first Cerebras HDF5 training
    shards of `data` that have one, or None.

    A source tokenised with another one is refused when it is prepared: its `data_params.json` names the sha256 of
    the tokenizer it was made with.
    """
    for source, _ in resolve_sources(data):
        for path in split_files(source, "train"):
            directory = Path(path).parent
            if file_format(path, source.format) == "cerebras_hdf5" and holds_tokenizer(directory):
                return directory
    return None


def training_fingerprint(cfg: TokenizerConfig, data: DataConfig) -> str:
    """sha256 of what a trained tokenizer depends on: the training documents, vocab size, min frequency."""
    key = {
        "version": FORMAT_VERSION,
        "data": [split_key(source, "train") for source, _ in resolve_sources(data)],
        "vocab_size": cfg.vocab_size,
        "min_frequency": cfg.min_frequency,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def train_bpe(cfg: TokenizerConfig, data: DataConfig) -> Tokenizer:
    """A byte-level BPE with `<|endoftext|>` as id 0, trained on the documents of `data`'s train split.

    Every line of the training files is checked first (`scan_file`: a bad line fails naming file and line before
    any training); documents reach the trainer in bounded pieces (`trainer_pieces`), with a progress bar on a
    terminal and a log line before and after.
    """
    if cfg.vocab_size < MIN_VOCAB:
        raise ConfigError(
            "tokenizer.vocab_size", f"{cfg.vocab_size} is below {MIN_VOCAB} (256 byte tokens + {EOS}); use 4096 or more"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    sources = [source for source, _ in resolve_sources(data)]
    for source in sources:
        if any(file_format(path, source.format) == "cerebras_hdf5" for path in split_files(source, "train")):
            raise ConfigError(
                "tokenizer.path",
                f"{source.name} is already tokenised (cerebras_hdf5) and no tokenizer was saved beside its shards: "
                "give the tokenizer it was made with (e.g. tokenizer=gpt2) instead of training one",
            )
    started = time.perf_counter()
    scans = [scan_file(path, s.format, s.text_field) for s in sources for path in split_files(s, "train")]
    hub = any(not split_files(source, "train") for source in sources)  # streamed: its size is unknown
    log.info(
        "tokenizer: checked every line of %d training file(s) (%s documents, %.1f MB) in %.1f s; training a %d-token "
        "BPE on them",
        len(scans),
        f"{sum(scan.documents for scan in scans):,}",
        sum(scan.text_bytes for scan in scans) / 1e6,
        time.perf_counter() - started,
        cfg.vocab_size,
    )
    documents = tqdm(
        (text for source in sources for text in iter_documents(source, "train")),
        total=None if hub else sum(scan.documents for scan in scans),
        desc="tokenizer: counting words",
        unit="doc",
        disable=not sys.stderr.isatty(),
    )
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    started = time.perf_counter()
    tokenizer.train_from_iterator((piece for text in documents for piece in trainer_pieces(text)), trainer=trainer)
    log.info(
        "tokenizer: %s documents read and a %d-token vocabulary learned in %.1f s",
        f"{documents.n:,}",
        cfg.vocab_size,
        time.perf_counter() - started,
    )
    return tokenizer


def holds_tokenizer(directory: Path) -> bool:
    """Whether a model directory holds a saved tokenizer (`save_pretrained`'s files)."""
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_pretrained(path: str) -> PreTrainedTokenizerFast:
    """`AutoTokenizer.from_pretrained(path)`, a local directory or a hub name; pad falls back to EOS.

    Raises:
        ConfigError: `tokenizer.path` cannot be loaded (offline, only local directories work), is not a fast
            tokenizer, or has no EOS token.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "tokenizer.path",
            f"cannot load {path!r} ({describe_error(exc)}); offline (HF_HUB_OFFLINE=1) a local directory "
            "written by save_pretrained works, or tokenizer.path=null trains a BPE on the corpus",
        ) from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ConfigError("tokenizer.path", f"{path!r} is a {type(tokenizer).__name__}; a fast tokenizer is needed")
    if tokenizer.eos_token is None:
        raise ConfigError("tokenizer.path", f"{path!r} has no EOS token, which separates documents")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a unique temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

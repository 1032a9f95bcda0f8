"""Configs for pre-training corpora and tokenizers (mirrored one to one by the Hydra `data`/`tokenizer` groups)."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("auto", "text", "json")


@dataclass
class DataConfig:
    """A corpus: local text / JSON Lines files (optionally .gz), or a dataset on the Hugging Face hub.

    Local files win when given; otherwise `hub_name` is loaded with `datasets.load_dataset`. Documents
    are tokenised, joined with EOS and packed into blocks of `seq_len + 1` tokens (inputs and shifted
    targets), cached under `cache_dir` by a fingerprint of the inputs.
    """

    name: str = "pubmed_sample"
    train_files: list[str] = field(default_factory=list)
    validation_files: list[str] = field(default_factory=list)
    hub_name: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    format: str = "auto"
    text_field: str = "text"
    seq_len: int = 128
    cache_dir: str = ".cache/modelzoo"


@dataclass
class TokenizerConfig:
    """`path: null` trains a byte-level BPE on the training corpus; otherwise a local path or a hub name."""

    name: str = "bpe"
    path: str | None = None
    vocab_size: int = 4096
    min_frequency: int = 2

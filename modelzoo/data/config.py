"""Configs for pre-training corpora and tokenizers (mirrored one to one by the Hydra `data`/`tokenizer` groups)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import PurePath

from modelzoo.errors import ConfigError

FORMATS = ("auto", "text", "json", "cerebras_hdf5")
# Overrides that give a data node its own documents: its format is then detected from their extensions unless
# the same command line sets `data.format` too (the node's own `format`, e.g. the shipped sample's `text`,
# describes the node's own files, not the user's). Own training files also name the corpus (`data.name`, unless
# the command line sets it): the node's name (`pubmed_sample`) is that of the node's own files.
OWN_FILES_KEYS = ("data.train_files", "data.validation_files")
# File stems that say which split a file holds, not which corpus: such a file is named by its folder.
SPLIT_STEMS = ("train", "training", "valid", "validation", "val", "dev", "test", "data")


@dataclass
class SourceConfig:
    """One corpus of a mixture (`data.sources`): its documents and its sampling weight.

    Unset fields (`None`) take the value of the enclosing `data` node; `seq_len` may only repeat it (every
    source of a mixture is packed into blocks of the same length, with the same tokenizer).
    """

    name: str = "source"
    weight: float = 1.0
    train_files: list[str] = field(default_factory=list)
    validation_files: list[str] = field(default_factory=list)
    hub_name: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None
    train_split: str | None = None
    validation_split: str | None = None
    format: str = "auto"
    text_field: str | None = None
    validation_fraction: float | None = None
    seq_len: int | None = None


@dataclass
class DataConfig:
    """A corpus: local text / JSON Lines files (optionally .gz, globs allowed), a hub dataset, or a mixture.

    Local files win when given; otherwise `hub_name` is streamed with `datasets.load_dataset(...,
    streaming=True)`. Documents are tokenised in `num_workers` processes, joined with EOS and packed into
    blocks of `seq_len + 1` tokens (inputs and shifted targets), written as memory-mapped shards of
    `shard_blocks` blocks under `cache_dir` by a fingerprint of the inputs. `validation_fraction` > 0 holds
    out that fraction of the training documents (chosen by a hash of each document) instead of
    `validation_files`. `sources` (a list of `SourceConfig`) makes the corpus a weighted mixture; the fields
    above are then the sources' defaults. `name` (in logs, the run summary and `prepare-data --cerebras-hdf5`
    folders), left null, says what the corpus reads: see `corpus_name`.
    """

    name: str | None = None
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
    validation_fraction: float = 0.0
    num_workers: int | None = None
    shard_blocks: int = 8192
    sources: list[SourceConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = corpus_name(self.train_files, self.hub_name)


def corpus_name(train_files: list[str], hub_name: str | None) -> str:
    """The name of a corpus that names none: its first training file's name without extensions (`notes` for
    `notes.jsonl.gz`), or, for a file named after its split (`train.txt`) or a glob, its folder's (`abstracts` for
    `abstracts/train.txt`); else the hub dataset's (`ccdv_pubmed-summarization`). Characters other than letters,
    digits, `.`, `-` and `_` become `_`, so the name is one folder name."""
    name = "corpus"
    if train_files:
        path = PurePath(train_files[0])
        stem = path.name.split(".")[0]
        named_by_folder = not stem or stem.lower() in SPLIT_STEMS or any(c in path.name for c in "*?[")
        name = path.parent.name if named_by_folder and path.parent.name not in ("", ".", "..") else stem
    elif hub_name:
        name = hub_name
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "corpus"


@dataclass
class TokenizerConfig:
    """`path: null` trains a byte-level BPE on the training corpus; otherwise a local path or a hub name."""

    name: str = "bpe"
    path: str | None = None
    vocab_size: int = 4096
    min_frequency: int = 2


def with_own_files_defaults(overrides: list[str]) -> list[str]:
    """`overrides` plus `data.format=auto` when they give the data node its own files but no format, and
    `data.name=null` (named by its files, `corpus_name`) when they give it its own training files but no name."""
    keys = {item.split("=", 1)[0].lstrip("+~") for item in overrides if "=" in item}
    added = []
    if keys & set(OWN_FILES_KEYS) and "data.format" not in keys:
        added.append("data.format=auto")
    if "data.train_files" in keys and "data.name" not in keys:
        added.append("data.name=null")
    return [*overrides, *added]


def resolve_sources(cfg: DataConfig) -> list[tuple[DataConfig, float]]:
    """The corpora of `cfg` with their sampling weights: `cfg` itself, or each of `cfg.sources` filled in.

    Raises:
        ConfigError: a weight <= 0, a source with its own `seq_len`, a repeated name, or a source that has
            no documents; each names `data.sources[i].<key>`.
    """
    if not cfg.sources:
        return [(cfg, 1.0)]
    resolved, names = [], set()
    for i, source in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        if not source.weight > 0:
            raise ConfigError(f"{key}.weight", f"{source.name}: must be > 0, got {source.weight}")
        if source.seq_len is not None and source.seq_len != cfg.seq_len:
            raise ConfigError(
                f"{key}.seq_len",
                f"{source.name}: {source.seq_len} differs from data.seq_len={cfg.seq_len}; the sources of a mixture "
                "are packed into blocks of one length (drop the key or prepare the source apart)",
            )
        if source.name in names:
            raise ConfigError(f"{key}.name", f"{source.name!r} names two sources; give each a unique name")
        if not source.train_files and not source.hub_name:
            raise ConfigError(f"{key}.train_files", f"{source.name}: no documents; give train_files or hub_name")
        names.add(source.name)
        resolved.append((_source_config(cfg, source), source.weight))
    return resolved


def _source_config(cfg: DataConfig, source: SourceConfig) -> DataConfig:
    inherited = {
        key: getattr(source, key) if getattr(source, key) is not None else getattr(cfg, key)
        for key in ("train_split", "validation_split", "text_field", "validation_fraction")
    }
    return replace(
        cfg,
        name=source.name,
        train_files=list(source.train_files),
        validation_files=list(source.validation_files),
        hub_name=source.hub_name,
        hub_config=source.hub_config,
        hub_revision=source.hub_revision,
        format=source.format,
        sources=[],
        **inherited,
    )


def describe(cfg: DataConfig) -> str:
    """What a corpus reads, for logs: its files, its hub dataset, or its sources and weights."""
    if cfg.sources:
        return "mixture " + ", ".join(
            f"{s.name} ({s.weight:g}): {describe(c)}"
            for (c, _), s in zip(resolve_sources(cfg), cfg.sources, strict=True)
        )
    if cfg.train_files:
        return ", ".join(cfg.train_files)
    return f"{cfg.hub_name}[{cfg.train_split}]"

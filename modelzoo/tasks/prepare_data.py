"""`modelzoo prepare-data`: build the tokenizer, prepare every source of the corpus, report (or estimate)."""

from __future__ import annotations

from pathlib import Path

from modelzoo.data.cerebras_hdf5 import write_hdf5
from modelzoo.data.config import DataConfig, TokenizerConfig, resolve_sources
from modelzoo.data.corpus import load_corpus
from modelzoo.data.prepare import estimate, tokenizer_fingerprint
from modelzoo.data.tokenizer import build_tokenizer
from modelzoo.errors import ModelZooError
from modelzoo.validate import validated_config

HDF5_SAMPLES_PER_FILE = 50_000


def run(
    data: DataConfig, tokenizer_cfg: TokenizerConfig, dry_run: bool = False, cerebras_hdf5: str | None = None
) -> str:
    """The corpus's report; with `dry_run`, an estimate (nothing but the tokenizer is written).

    `cerebras_hdf5`: also write each split of each source as Cerebras Model Zoo GPT HDF5 shards under
    `<cerebras_hdf5>/<source>/<split>/`, with the tokenizer beside them (`save_pretrained` form).
    """
    tokenizer = build_tokenizer(tokenizer_cfg, data)
    if dry_run:
        return "\n".join(estimate(source, tokenizer) for source, _ in resolve_sources(data))
    corpus = load_corpus(data, tokenizer, progress=True)
    lines = [source.report.format() for source in corpus.sources]
    if cerebras_hdf5:
        processing = {"modelzoo_tokenizer_sha256": tokenizer_fingerprint(tokenizer), "eos_id": tokenizer.eos_token_id}
        for source in corpus.sources:
            for split, blocks in (("train", source.train), ("validation", source.validation)):
                out = Path(cerebras_hdf5) / source.name / split
                files = write_hdf5(blocks, out, HDF5_SAMPLES_PER_FILE, processing)
                tokenizer.save_pretrained(out)  # read back when a run names no tokenizer
                lines.append(
                    f"cerebras_hdf5 {source.name} {split}: {len(blocks):,} samples in {len(files)} file(s) {out}"
                )
    return "\n".join(lines)


def main(args: list[str]) -> None:
    """`modelzoo prepare-data [--dry-run] [--cerebras-hdf5=DIR] [overrides]`: prepare the `data` corpus (every
    source of a mixture) into the cache that `pretrain` reads."""
    flags = [a for a in args if a.startswith("--")]
    unknown = [f for f in flags if f != "--dry-run" and not f.startswith("--cerebras-hdf5=")]
    if unknown:
        raise ModelZooError(
            f"unknown flag {unknown[0]}; usage: modelzoo prepare-data [--dry-run] [--cerebras-hdf5=DIR] [overrides]"
        )
    cfg = validated_config([a for a in args if not a.startswith("--")], "pretrain")
    hdf5 = next((f.split("=", 1)[1] for f in flags if f.startswith("--cerebras-hdf5=")), None)
    print(run(cfg.data, cfg.tokenizer, dry_run="--dry-run" in flags, cerebras_hdf5=hdf5))

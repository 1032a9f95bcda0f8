"""Build the PubMed sample shipped in the package as the default corpus (`modelzoo/data/samples/pubmed/`).

Reads `train.txt` / `validation.txt` / `NOTICE.txt` of the shared PubMed abstracts corpus (one document per
line, `title + " " + abstract`), checks them against the sha256 its README documents, and writes
`train.txt.gz` (a deterministic sample), `validation.txt.gz` (all of it), `NOTICE.txt` and `README.md`.
The gzip files carry no name and mtime 0, so a rebuild is byte-identical. Run from the repo root:

    python scripts/build_pubmed_sample.py --source ../shared/data/pubmed_abstracts
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "pubmed_abstracts"
DEFAULT_OUTPUT = REPO / "modelzoo" / "data" / "samples" / "pubmed"
NUM_TRAIN = 2500
# As listed in the "sha256" section of shared/data/README.md.
SOURCE_SHA256 = {
    "train.txt": "ee67bdab141bf02cde168e2be2f60a3c05e6fb7696578f37a3ccd0753d134bdf",
    "validation.txt": "8d8d2cc8f62fdc5092ebea56672253283501312e2bec387dd07f83ce299aee78",
    "NOTICE.txt": "97996bd94f36055817aeb66f8a139a3e56b1bd2ea1a88770e488843159983b00",
}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(source: Path, name: str) -> bytes:
    """The bytes of `source/name`, refused unless they match the documented sha256."""
    path = source / name
    if not path.is_file():
        raise SystemExit(f"{path}: not found; pass --source <dir with {', '.join(SOURCE_SHA256)}>")
    data = path.read_bytes()
    if sha256_hex(data) != SOURCE_SHA256[name]:
        raise SystemExit(
            f"{path}: sha256 {sha256_hex(data)} differs from the documented {SOURCE_SHA256[name]}; "
            "update SOURCE_SHA256 and the README together if the shared corpus changed on purpose"
        )
    return data


def sample(documents: list[str], n: int) -> list[str]:
    """The `n` documents with the smallest sha256 of their UTF-8 text, kept in their original order.

    The source files are ordered by source corpus, so a prefix would be BioCreative VI only; ranking by a
    content hash mixes all three sources and does not depend on the file's order.
    """
    keep = set(sorted(range(len(documents)), key=lambda i: sha256_hex(documents[i].encode()))[:n])
    return [doc for i, doc in enumerate(documents) if i in keep]


def gzip_bytes(documents: list[str]) -> bytes:
    """One document per line, gzip-compressed with no file name and mtime 0 (byte-reproducible)."""
    text = "".join(doc + "\n" for doc in documents).encode()
    return gzip.compress(text, compresslevel=9, mtime=0)


def readme(counts: dict[str, tuple[int, int]], digests: dict[str, str]) -> str:
    """README.md of the sample: source, licence, counts and the command that rebuilds it."""
    shipped = "\n".join(
        f"- `{name}`: {docs:,} documents, {chars:,} characters (sha256 `{digests[name]}`)"
        for name, (docs, chars) in counts.items()
    )
    sources = "\n".join(f"    {digest}  pubmed_abstracts/{name}" for name, digest in SOURCE_SHA256.items())
    return f"""# PubMed abstracts sample (the default corpus)

A small sample of PubMed titles + abstracts, one document per line (`title + " " + abstract`), so that
`modelzoo pretrain` runs out of the box (`data=pubmed_sample`, the default). For the whole corpus use
`data=pubmed_abstracts`.

## Files

{shipped}
- `NOTICE.txt`: the public-domain notices of the source corpora, copied verbatim.

## Source

`shared/data/pubmed_abstracts/` (described in section 3 of `shared/data/README.md`): 7,645 train and
149 validation documents from the BioCreative VI Precision Medicine track (`ncbi-nlp/BC6PM`), the
BioCreative V CDR corpus (via `microsoft/BioGPT`) and the NCBI disease corpus (`spyysalo/ncbi-disease`),
de-duplicated by PMID and with every PubMedQA PQA-L and HoC document removed. Files used (sha256):

{sources}

`train.txt.gz` holds the {counts["train.txt.gz"][0]:,} training documents with the smallest sha256 of their
UTF-8 text, in their original order (a hash-ranked subset mixes the three sources; a prefix would not).
`validation.txt.gz` holds all validation documents unchanged.

## Licence

United States Government Work, public domain: each of the three source corpora carries the NCBI
public-domain notice ("written as part of the authors' official duties as a United States Government
employee", no restriction on use or reproduction; see `NOTICE.txt`). The sample redistributes their
title and abstract text unchanged. The BioCreative V CDR and NCBI disease notices ask users to cite the
corpus papers listed in `NOTICE.txt`.

## Rebuild

From the repository root (byte-identical output; the script checks the sha256 above first):

    python scripts/build_pubmed_sample.py --source ../shared/data/pubmed_abstracts
"""


def build(source: Path, output: Path) -> None:
    """Write the sample, NOTICE.txt and README.md into `output`."""
    train = read_source(source, "train.txt").decode().splitlines()
    validation = read_source(source, "validation.txt").decode().splitlines()
    splits = {"train.txt.gz": sample(train, NUM_TRAIN), "validation.txt.gz": validation}
    output.mkdir(parents=True, exist_ok=True)
    digests, counts = {}, {}
    for name, documents in splits.items():
        data = gzip_bytes(documents)
        (output / name).write_bytes(data)
        digests[name] = sha256_hex(data)
        counts[name] = (len(documents), sum(len(doc) for doc in documents))
    (output / "NOTICE.txt").write_bytes(read_source(source, "NOTICE.txt"))
    (output / "README.md").write_text(readme(counts, digests), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="shared pubmed_abstracts directory")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the sample is written")
    args = parser.parse_args(argv)
    build(args.source, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

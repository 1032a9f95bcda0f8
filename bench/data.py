"""Data preparation: tokenisation throughput and peak memory by corpus size and workers; `pretrain`'s data start-up.

Synthetic corpora of about 10 MB, 100 MB and 1 GB of text are built from the shipped PubMed abstracts
(copies of the 2,500 training abstracts, each copy's documents prefixed with its number, so no two
documents are equal). Each (size, workers) case prepares the corpus into an empty cache in a fresh process
(`modelzoo.data.corpus.load_corpus`, the code path of `modelzoo prepare-data` and of `pretrain` on a cache
miss) with the tokenizer the default run trains (byte-level BPE, 4,096 ids), seq_len 128. Throughput is
tokens written (train + validation, EOS included) over the process's wall time for the preparation,
the line-by-line check of every file included. Peak RSS is `ru_maxrss` of the preparing process and of
its largest worker.

The start-up comparison times what the default `modelzoo pretrain` (`data=pubmed_sample`) does before it
builds the model: the imports, then config + tokenizer (trained once, cached) + corpus with an empty
corpus cache and again with a cache hit, for the code before this change (`--before DIR`, a checkout of
it) and now, in fresh processes, interleaved. The machine has 2 cores shared with other jobs (see the load
averages): every number here is noisy, the start-up ones most.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, add_common_arguments, begin, markdown_table, publish

SAMPLE = REPO / "modelzoo" / "data" / "samples" / "pubmed"
SIZES = {"10MB": 10e6, "100MB": 100e6, "1GB": 1e9}
SECTION = "Data preparation: tokenisation throughput and peak memory (bench/data.py)"
MIB = 2**20

PREPARE = """
import json, resource, sys, time
from modelzoo.data.config import DataConfig
from modelzoo.data.corpus import load_corpus
from transformers import PreTrainedTokenizerFast
root, workers = sys.argv[1], int(sys.argv[2])
tokenizer = PreTrainedTokenizerFast(tokenizer_file=root + "/tokenizer.json", eos_token="<|endoftext|>")
cfg = DataConfig(train_files=[root + "/train.txt"], validation_files=[root + "/validation.txt"], seq_len=128,
                 cache_dir=sys.argv[3], num_workers=workers)
start = time.perf_counter()
corpus = load_corpus(cfg, tokenizer, progress=False)
seconds = time.perf_counter() - start
report = corpus.sources[0].report
print(json.dumps({
    "seconds": seconds,
    "documents": sum(s.documents for s in report.splits.values()),
    "tokens": corpus.train_tokens + corpus.validation_tokens,
    "shards": sum(s.shards for s in report.splits.values()),
    "bytes": sum(s.bytes for s in report.splits.values()),
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
}))
"""

STARTUP = """
import sys, time
start = time.perf_counter()
from modelzoo.config import load_config, to_object
from modelzoo.data.corpus import load_corpus
from modelzoo.data.tokenizer import build_tokenizer
imported = time.perf_counter()
seconds = []
for _ in range(2):  # an empty corpus cache, then a cache hit
    begin = time.perf_counter()
    cfg = to_object(load_config(["task=pretrain", "data.cache_dir=" + sys.argv[1]]))
    corpus = load_corpus(cfg.data, build_tokenizer(cfg.tokenizer, cfg.data))
    seconds.append(time.perf_counter() - begin)
print(imported - start, *seconds)
"""


def build_corpus(root: Path, size: float) -> None:
    """`train.txt` of about `size` bytes from copies of the shipped abstracts; the shipped validation split."""
    with gzip.open(SAMPLE / "train.txt.gz", "rt", encoding="utf-8") as f:
        abstracts = f.read().splitlines()
    with open(root / "train.txt", "w", encoding="utf-8") as out:
        written, copy = 0, 0
        while written < size:
            block = "".join(f"[{copy}] {line}\n" for line in abstracts)
            out.write(block)
            written += len(block.encode("utf-8"))
            copy += 1
    with gzip.open(SAMPLE / "validation.txt.gz", "rt", encoding="utf-8") as f:
        (root / "validation.txt").write_text(f.read(), encoding="utf-8")


def train_tokenizer(root: Path) -> None:
    from modelzoo.config import load_config, to_object
    from modelzoo.data.tokenizer import build_tokenizer

    cfg = to_object(load_config(["task=pretrain", f"data.cache_dir={root / 'tokenizer-cache'}"]))
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data)
    (root / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())


def prepare_case(root: Path, workers: int) -> dict:
    cache = root / f"cache-{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-c", PREPARE, str(root), str(workers), str(cache)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    shutil.rmtree(cache, ignore_errors=True)
    return json.loads(out.strip().splitlines()[-1])


def startup(code: Path | None, cache: Path) -> list[float]:
    """Seconds of the imports, the cold and the warm data start-up of one fresh process."""
    env = {**os.environ, **({"PYTHONPATH": str(code)} if code else {})}
    for stale in ("corpus", "datasets"):  # the old code also cached its tokenisation in `datasets`' own cache
        shutil.rmtree(cache / stale, ignore_errors=True)  # (the trained tokenizer stays cached, as in a second run)
    cache.mkdir(parents=True, exist_ok=True)  # also the cwd: `python -c` imports from its cwd first
    out = subprocess.run(
        [sys.executable, "-c", STARTUP, str(cache)], check=True, capture_output=True, text=True, env=env, cwd=cache
    ).stdout
    return [float(x) for x in out.split()[-3:]]


def startup_rows(before: Path | None, repeats: int) -> list[list[str]]:
    """Median seconds of the default run's imports and data start-up (cold and warm), before and after."""
    variants = {"before": before, "now": None} if before else {"now": None}
    samples: dict[str, list[list[float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for name, code in variants.items():  # untimed: trains the cached tokenizer
            startup(code, Path(tmp) / name)
        for _ in range(repeats):
            for name, code in variants.items():
                samples[name].append(startup(code, Path(tmp) / name))
    rows = []
    for i, what in enumerate(
        [
            "imports (torch, transformers, datasets, ...)",
            "tokenizer + corpus, empty cache",
            "tokenizer + corpus, cache hit",
        ]
    ):
        cells = {name: sorted(run[i] for run in samples[name])[len(samples[name]) // 2] for name in variants}
        ratio = f"{cells['before'] / cells['now']:.2f}x" if before else "-"
        rows.append([what, *(f"{cells[name]:.2f}" for name in variants), ratio])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10MB,100MB,1GB", help="corpus sizes (default: 10MB,100MB,1GB)")
    parser.add_argument("--workers", default="1,2", help="data.num_workers values (default: 1,2)")
    parser.add_argument("--before", type=Path, help="a checkout of the code before this change, for start-up")
    parser.add_argument("--startup-repeats", type=int, default=5, help="interleaved start-up rounds (default: 5)")
    parser.add_argument("--work-dir", type=Path, help="where the corpora are built (default: a temporary dir)")
    add_common_arguments(parser)
    args = parser.parse_args()
    env = begin(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    start_rows = startup_rows(args.before, args.startup_repeats)
    print(start_rows, flush=True)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        base = Path(tmp)
        train_tokenizer(base)
        for size in args.sizes.split(","):  # the section is rewritten after each size: a stopped run keeps its rows
            rows += size_rows(base, size, workers)
            publish(SECTION, section_text(rows, start_rows, args.before is not None), env, args.write)


def size_rows(base: Path, size: str, workers: list[int]) -> list[list[object]]:
    root = base / size
    root.mkdir()
    shutil.copy(base / "tokenizer.json", root / "tokenizer.json")
    build_corpus(root, SIZES[size])
    text = (root / "train.txt").stat().st_size + (root / "validation.txt").stat().st_size
    rows, rates = [], {}
    for count in workers:
        r = prepare_case(root, count)
        rates[count] = r["tokens"] / r["seconds"]
        row = [
            size,
            f"{text / 1e6:,.0f}",
            count,
            f"{r['documents']:,}",
            f"{r['tokens'] / 1e6:,.1f}",
            r["shards"],
            f"{r['seconds']:.1f}",
            f"{r['documents'] / r['seconds']:,.0f}",
            f"{rates[count]:,.0f}",
            f"{rates[count] / rates[workers[0]]:.2f}x",
            f"{r['peak_rss'] / MIB:,.0f}",
            f"{r['worker_peak_rss'] / MIB:,.0f}",
        ]
        rows.append(row)
        print(" | ".join(map(str, row)), flush=True)
    shutil.rmtree(root)
    return rows


def section_text(rows: list[list[object]], start_rows: list[list[str]], before: bool) -> str:
    header = [
        "corpus",
        "text MB",
        "workers",
        "documents",
        "tokens M",
        "shards",
        "wall s",
        "docs/s",
        "tokens/s",
        "vs 1 worker",
        "peak RSS MiB",
        "worker peak RSS MiB",
    ]
    start_header = ["stage", *(["before s"] if before else []), "now s", "before / now"]
    return "\n\n".join(
        [
            __doc__.split("\n", 1)[1].strip(),
            markdown_table(header, rows),
            "### Start-up of the default `modelzoo pretrain` (data=pubmed_sample), median of fresh processes",
            markdown_table(start_header, start_rows),
        ]
    )


if __name__ == "__main__":
    main()

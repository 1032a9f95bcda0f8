"""Benchmark one-shot pruning on CPU: wall time and peak memory of SparseGPT, Wanda and magnitude per model shape.

What is measured is in `METHOD`, which also heads the section this writes to `docs/benchmarks.md`.
Usage: `python bench/prune.py [--shapes tiny,med2] [--write]`; see `--help`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
from common import add_common_arguments, begin, markdown_table, publish, split_choices
from train_step import model_size

from modelzoo.config.prune import PruneConfig
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.prune.sequential import prune_model

METHOD = """\
One-shot pruning of every block matrix (Cerebras' default filter) to 50% unstructured sparsity with
`modelzoo.prune.sequential.prune_model`, fp32 on CPU, each (shape, method) in a fresh process. The model has
random weights (seeded) and the calibration sequences random token ids: the work does not depend on their
values. Wall time covers the whole block-by-block pass (catching the first block's inputs, per block: the
calibration forward with X Xᵀ hooks, pruning every selected layer, the forward of the pruned block).
Peak RSS is the process's `ru_maxrss` at the end; "before" is its resident size just before pruning (the model,
the calibration tokens and the Python/torch runtime), so the difference is what pruning adds at its peak.
Each case is timed once: on a shared machine the times are indicative, not precise.
"""
SECTION = "One-shot pruning: wall time and peak memory (bench/prune.py)"
METHODS = ("sparsegpt", "wanda", "magnitude")
MIB = 2**20


@dataclass(frozen=True)
class Shape:
    model: GPTConfig
    samples: int
    seq: int
    batch_size: int
    methods: tuple[str, ...]
    full_depth: int | None = None  # layers of the model this shape is cut from
    note: str = ""


@dataclass(frozen=True)
class Measurement:
    seconds: float
    rss_before: int  # bytes
    peak_rss: int  # bytes
    sparsity: float
    pruned_weights: int
    params: int


SHAPES = {
    "tiny": Shape(model_size("tiny"), samples=128, seq=128, batch_size=8, methods=METHODS),
    "med2": Shape(
        model_size("med", name="med2", n_layer=2),
        samples=8,
        seq=2048,
        batch_size=1,
        methods=("sparsegpt", "wanda"),
        full_depth=24,
        note="GPT-3 Medium width with 2 of its 24 layers, so that a run takes minutes on a 2-core CPU. Blocks are "
        "pruned one after another, so time grows linearly with depth while the peak added by pruning stays one "
        "block's activations and Hessians; the resident model grows with depth.",
    ),
}


def _rss() -> int:
    """Current resident set size in bytes (Linux `/proc/self/statm`)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(shape: Shape, method: str, threads: int, seed: int = 0) -> Measurement:
    """Prune a fresh model of `shape` with `method`; meant to run in its own process (peak RSS is per process)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = GPT(shape.model).eval()
    tokens = torch.randint(0, shape.model.vocab_size, (shape.samples, shape.seq))
    before = _rss()
    start = time.perf_counter()
    result = prune_model(model, tokens, PruneConfig(method=method, sparsity=0.5, batch_size=shape.batch_size))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    pruned = sum(mask.numel() for mask in result.masks.values())
    return Measurement(seconds, before, peak, result.sparsity, pruned, model.num_params(non_embedding=False))


def measure_in_subprocess(shape: Shape, method: str, threads: int) -> Measurement:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, shape, method, threads).result()


def report(name: str, shape: Shape, results: dict[str, Measurement]) -> str:
    m, first = shape.model, next(iter(results.values()))
    lines = [
        f"### {name}: {m.n_layer} layers, d_model {m.n_embd}, ffn {m.n_inner}, vocab {m.vocab_size}; "
        f"{shape.samples} calibration sequences x {shape.seq} tokens",
        "",
        f"{first.pruned_weights / 1e6:.1f}M of {first.params / 1e6:.1f}M parameters pruned (fp32 model "
        f"{first.params * 4 / MIB:,.0f} MiB)." + (f" {shape.note}" if shape.note else ""),
        "",
    ]
    if shape.full_depth:
        estimates = ", ".join(
            f"{method} {r.seconds / m.n_layer * shape.full_depth / 60:.0f} min" for method, r in results.items()
        )
        lines += [f"Estimated for all {shape.full_depth} layers (s / block x {shape.full_depth}): {estimates}.", ""]
    rows = [
        [
            method,
            f"{r.seconds:.1f}",
            f"{r.seconds / m.n_layer:.1f}",
            f"{r.rss_before / MIB:,.0f}",
            f"{r.peak_rss / MIB:,.0f}",
            f"{(r.peak_rss - r.rss_before) / MIB:,.0f}",
            f"{r.sparsity:.1%}",
        ]
        for method, r in results.items()
    ]
    header = ["method", "wall s", "s / block", "RSS before MiB", "peak RSS MiB", "added MiB", "sparsity"]
    return "\n".join([*lines, markdown_table(header, rows)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,med2", help=f"comma-separated, out of {sorted(SHAPES)}")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.shapes = split_choices(parser, "--shapes", args.shapes, list(SHAPES))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = begin(args.threads)  # each case runs in a fresh process with the same thread count
    parts = [METHOD.strip()]
    for name in args.shapes:
        shape = SHAPES[name]
        results = {method: measure_in_subprocess(shape, method, args.threads) for method in shape.methods}
        parts.append(report(name, shape, results))
        print(parts[-1], "\n", flush=True)
    publish(SECTION, "\n\n".join(parts), env, args.write)


if __name__ == "__main__":
    main()

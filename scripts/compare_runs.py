"""Compare pre-training runs: a markdown table of their summaries and a plot of validation loss.

    python scripts/compare_runs.py runs/tiny-static_75 runs/tiny-dense --plot docs/pretrain_tiny.png

Reads each run's `summary.json` and `metrics.csv` (written by `modelzoo pretrain`). The plot shows
validation loss against training steps and against training FLOPs (sparse-effective, i.e. what a
sparsity-aware machine like the CS-2 executes), with the unigram baseline.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load_run(run_dir: Path) -> tuple[dict, list[tuple[int, float]]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    with (run_dir / "metrics.csv").open() as f:
        curve = [(int(r["step"]), float(r["val_loss"])) for r in csv.DictReader(f) if r["val_loss"]]
    return summary, curve


def label(run_dir: Path, summary: dict) -> str:
    kind = "dense" if summary["sparsity"] is None else f"{summary['sparsity']:.0%} sparse"
    return f"{run_dir.name} ({kind})"


def markdown_table(runs: dict[Path, tuple[dict, list]]) -> str:
    rows = [
        "| run | steps | tokens | val loss | val ppl | unigram loss | sparsity | training FLOPs (sparse-effective) "
        "| dense-equivalent FLOPs | tok/s (CPU) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run_dir, (s, _) in runs.items():
        sparsity = "dense" if s["sparsity"] is None else f"{s['sparsity']:.1%}"
        rows.append(
            f"| {run_dir.name} | {s['steps']:,} | {s['tokens']:,} | {s['val_loss']:.4f} | {s['val_ppl']:.1f} "
            f"| {s['unigram_loss']:.4f} | {sparsity} | {s['sparse_flops']:.3g} | {s['dense_flops']:.3g} "
            f"| {s['tokens_per_s']:,.0f} |"
        )
    return "\n".join(rows)


def plot(runs: dict[Path, tuple[dict, list]], path: Path) -> None:
    fig, (by_step, by_flops) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run_dir, (s, curve) in runs.items():
        steps = [step for step, _ in curve]
        losses = [loss for _, loss in curve]
        flops_per_step = s["sparse_flops"] / s["steps"]
        by_step.plot(steps, losses, marker="o", label=label(run_dir, s))
        by_flops.plot([st * flops_per_step for st in steps], losses, marker="o", label=label(run_dir, s))
    unigram = next(iter(runs.values()))[0]["unigram_loss"]
    for ax in (by_step, by_flops):
        ax.axhline(unigram, color="grey", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
        ax.grid(alpha=0.3)
    by_step.set_xlabel("training step")
    by_flops.set_xlabel("training FLOPs (sparse-effective)")
    by_step.set_ylabel("validation loss (nats/token)")
    by_flops.legend()
    fig.suptitle("Validation loss on held-out PubMed abstracts")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of `modelzoo pretrain`")
    parser.add_argument("--plot", type=Path, help="write the loss plot (PNG) here")
    args = parser.parse_args()
    runs = {run: load_run(run) for run in args.runs}
    print(markdown_table(runs))
    for run_dir, (s, _) in runs.items():
        print(f"{run_dir.name}: validation perplexity {s['val_ppl']:.1f} vs unigram {math.exp(s['unigram_loss']):.1f}")
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()

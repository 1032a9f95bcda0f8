"""Evaluation results as a markdown table, JSON, and a plot of PubMedQA accuracy against training FLOPs."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from matplotlib.figure import Figure

from modelzoo.downstream.evaluate import PubMedQAResult
from modelzoo.flops import format_flops

RESULTS_JSON, RESULTS_MD, PLOT, PREDICTIONS = "results.json", "results.md", "accuracy_vs_flops.png", "predictions"


def markdown_table(results: Sequence[PubMedQAResult]) -> str:
    """One row per model: accuracy and macro-F1 with the majority-class baseline, FLOPs, speed."""
    first = results[0]
    lines = [
        f"PubMedQA {first.split} ({first.n} questions, zero-shot, lm-eval `pubmedqa` prompt and scoring); "
        f"majority-class baseline: always {first.baseline_label!r}, accuracy {first.baseline_accuracy:.1%}, "
        f"macro-F1 {first.baseline_macro_f1:.3f}.",
        "",
        "| model | kind | step | accuracy | baseline | macro-F1 | predicted yes/no/maybe "
        "| training FLOPs (sparse-eff.) | dense FLOPs | examples/s |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        counts = "/".join(str(v) for v in r.predicted_counts.values())
        flops = format_flops(r.train_flops) if r.train_flops else "unknown"
        dense = format_flops(r.dense_train_flops) if r.dense_train_flops else "unknown"
        lines.append(
            f"| {r.model} | {r.kind} | {r.step if r.step is not None else '-'} | {r.accuracy:.1%} "
            f"| {r.baseline_accuracy:.1%} | {r.macro_f1:.3f} | {counts} | {flops} | {dense} | {r.examples_per_s:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_flops(results: Sequence[PubMedQAResult], path: Path) -> Path | None:
    """Accuracy against sparse-effective training FLOPs (log x) with the baseline as a line; None when no model
    has known FLOPs."""
    known = [r for r in results if r.train_flops]
    if not known:
        return None
    fig = Figure(figsize=(6.4, 4.2))  # no pyplot: no global backend state, works headless
    ax = fig.subplots()
    ax.scatter([r.train_flops for r in known], [100 * r.accuracy for r in known], zorder=3)
    for r in known:
        ax.annotate(r.model, (r.train_flops, 100 * r.accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(100 * known[0].baseline_accuracy, color="grey", linestyle="--", label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (sparse-effective)")
    ax.set_ylabel(f"PubMedQA {known[0].split} accuracy (%)")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_results(results: Sequence[PubMedQAResult], output_dir: str | Path) -> dict[str, Path]:
    """results.md, results.json, predictions/<i>-<model>.jsonl (per question: pubid, label, the three
    log-likelihoods, the prediction) and, when FLOPs are known, accuracy_vs_flops.png in `output_dir`."""
    output = Path(output_dir)
    (output / PREDICTIONS).mkdir(parents=True, exist_ok=True)
    written = {"markdown": output / RESULTS_MD, "json": output / RESULTS_JSON}
    written["markdown"].write_text(markdown_table(results))
    summaries = [{k: v for k, v in asdict(r).items() if k != "questions"} for r in results]
    written["json"].write_text(json.dumps(summaries, indent=2) + "\n")
    for i, r in enumerate(results):
        path = output / PREDICTIONS / f"{i}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', r.model)}.jsonl"
        path.write_text("".join(json.dumps(q) + "\n" for q in r.questions))
        written[f"predictions {r.model}"] = path
    plot = plot_accuracy_vs_flops(results, output / PLOT)
    if plot:
        written["plot"] = plot
    return written

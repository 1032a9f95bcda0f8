"""An experiment's results: each run's pre-training and downstream summaries, aggregated over seeds, as the
reproduction report's tables and plots (`scripts/reproduce.py` writes them into `docs/results.md`).

A cell is `mean ± std (n)`: the sample standard deviation over the `n` seeds that finished that stage.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelzoo.config.experiment import StageConfig

BUDGET_TITLES = {"steps": "equal steps (same tokens)", "dense_flops": "equal pre-training FLOPs"}


@dataclass(frozen=True)
class Run:
    """One pre-training run of a sweep and what its downstream stages wrote (missing stages are absent)."""

    budget: str
    sparsity: str
    seed: int
    run_dir: Path
    summary: dict | None = None
    stages: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def read(cls, budget: str, sparsity: str, seed: int, run_dir: Path, stages: Sequence[StageConfig]) -> Run:
        """The run's `summary.json` and each stage's `<stage>/summary.json`, where they exist."""
        summary = read_json(run_dir / "summary.json")
        found = {s.name: read_json(run_dir / s.name / "summary.json") for s in stages}
        return cls(budget, sparsity, seed, run_dir, summary, {k: v for k, v in found.items() if v is not None})


def read_json(path: Path) -> Any:
    """The JSON file at `path`, or None where there is none (a stage that has not run)."""
    return json.loads(path.read_text()) if path.is_file() else None


def test_score(stage: StageConfig, summary: dict) -> float:
    """A stage's test number: HoC BLURB F1, PubMedQA accuracy."""
    return summary["test"]["f1" if stage.dataset == "hoc" else "accuracy"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: Sequence[float], digits: int = 3, percent: bool = False) -> str:
    """`mean ± std (n)`, or `-` without values."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    if percent:
        return f"{100 * mean:.1f}% ± {100 * std:.1f} ({len(values)})"
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({len(values)})"


def groups(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (budget, sparsity), in sweep order; only runs whose pre-training finished."""
    grouped: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.summary is not None:
            grouped.setdefault((run.budget, run.sparsity), []).append(run)
    return grouped


def stage_scores(runs: Sequence[Run], stage: StageConfig) -> list[float]:
    return [test_score(stage, r.stages[stage.name]) for r in runs if stage.name in r.stages]


def results_table(runs: Sequence[Run], stages: Sequence[StageConfig]) -> str:
    """One row per (budget, sparsity): pre-training length, FLOPs and loss, then each stage's test score."""
    titles = [f"{s.dataset} {s.task.replace('_', ' ')} ({s.sparsity})" for s in stages]
    header = [
        "comparison", "sparsity", "steps", "pre-training FLOPs (sparse-effective)", "dense run's / these", "val loss",
        "val ppl", *titles,
    ]  # fmt: skip
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    grouped = groups(runs)
    dense_flops = {b: g[0].summary["sparse_flops"] for (b, s), g in grouped.items() if s == "dense"}
    dense_flops.setdefault("dense_flops", dense_flops.get("steps"))
    for (budget, sparsity), members in grouped.items():
        summaries = [r.summary for r in members]
        flops = statistics.fmean(s["sparse_flops"] for s in summaries)
        ratio = f"{dense_flops[budget] / flops:.2f}x" if dense_flops.get(budget) else "-"
        scores = [cell(stage_scores(members, st), percent=st.dataset == "pubmedqa") for st in stages]
        rows.append(
            f"| {BUDGET_TITLES[budget]} | {sparsity} | {summaries[0]['steps']:,} | {flops:.3g} | {ratio} | "
            f"{cell([s['val_loss'] for s in summaries], 4)} | {cell([s['val_ppl'] for s in summaries], 1)} | "
            + " | ".join(scores)
            + " |"
        )
    return "\n".join(rows)


def baselines_table(baselines: Sequence[dict]) -> str:
    rows = ["| dataset | baseline | dev | test | how |", "| --- | --- | --- | --- | --- |"]
    for b in baselines:
        percent = b["dataset"] == "pubmedqa"
        score = (lambda x: f"{100 * x:.1f}%") if percent else (lambda x: f"{x:.4f}")
        rows.append(f"| {b['dataset']} | {b['name']} | {score(b['dev'])} | {score(b['test'])} | {b['detail']} |")
    return "\n".join(rows)


def dev_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, dev score) of every evaluation a fine-tuning run logged in its `metrics.csv`."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [(int(r["step"]), float(r["dev_score"])) for r in csv.DictReader(f) if r.get("dev_score")]


def plot_results(runs: Sequence[Run], stage: StageConfig, baselines: Sequence[dict], path: Path) -> Path:
    """Three panels: validation loss vs pre-training FLOPs, `stage`'s test score vs pre-training FLOPs (both with
    seed error bars, one marker per comparison), and `stage`'s dev learning curve (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, score_ax, curve_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    sparsities = list(dict.fromkeys(r.sparsity for r in runs))
    colors = {s: f"C{i}" for i, s in enumerate(sparsities)}
    markers = {"steps": "o", "dense_flops": "s"}
    for (budget, sparsity), members in groups(runs).items():
        flops = statistics.fmean(r.summary["sparse_flops"] for r in members)
        label = f"{sparsity}, {BUDGET_TITLES[budget]}"
        style = {"color": colors[sparsity], "marker": markers[budget], "capsize": 3, "linestyle": "none"}
        loss, loss_std = mean_std([r.summary["val_loss"] for r in members])
        loss_ax.errorbar(flops, loss, yerr=loss_std, label=label, **style)
        scores = stage_scores(members, stage)
        if scores:
            score, score_std = mean_std(scores)
            score_ax.errorbar(flops, score, yerr=score_std, label=label, **style)
        curves = [dev_curve(r.run_dir / stage.name) for r in members if stage.name in r.stages]
        if budget == "steps" and curves and all(len(c) == len(curves[0]) for c in curves):
            steps = [s for s, _ in curves[0]]
            curve_ax.plot(steps, [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))],
                          color=colors[sparsity], marker="o", label=sparsity)  # fmt: skip
    for b in baselines:
        if b["dataset"] == stage.dataset and b["name"] != "all_hallmarks":
            score_ax.axhline(b["test"], color="grey", linestyle="--" if b["name"] == "constant_k" else ":")
            score_ax.annotate(b["name"], (score_ax.get_xlim()[0], b["test"]), fontsize=8, va="bottom")
            curve_ax.axhline(b["dev"], color="grey", linestyle="--" if b["name"] == "constant_k" else ":")
    loss_ax.set(xlabel="pre-training FLOPs (sparse-effective)", ylabel="validation loss", title="pre-training")
    score_ax.set(xlabel="pre-training FLOPs (sparse-effective)", ylabel=f"{stage.dataset} test",
                 title=f"{stage.dataset} {stage.task} ({stage.sparsity})")  # fmt: skip
    curve_ax.set(xlabel=f"{stage.task} step", ylabel=f"{stage.dataset} dev", title="learning curve (equal steps)")
    loss_ax.legend(fontsize=7)
    curve_ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

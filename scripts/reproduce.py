"""The SPDF / MediSwift comparison at small scale: both pre-training sweeps, the downstream stages, the baselines
and the report (`docs/results.md`), each step skipped when its output exists (a rerun continues).

    python scripts/reproduce.py                      # experiment=spdf_tiny, seeds 1,2,3: the whole grid
    python scripts/reproduce.py --report-only        # tables and plots from the finished runs

It only chains these commands (and times them):
1. `modelzoo pretrain -m experiment=E task.budget=steps sparsity=dense,static_50,static_75,rigl_75 seed=1,2,3`
   (equal steps: the same tokens, the sparse runs spend fewer FLOPs);
2. `modelzoo pretrain -m experiment=E task.budget=dense_flops sparsity=static_50,static_75,rigl_75 seed=1,2,3`
   (equal pre-training FLOPs: each sparse run trains until it has spent what the dense run spent);
3. for each run of the budgets in `--downstream`, each of the experiment's `experiment.stages` as
   `modelzoo finetune|prompt_tune task.pretrained=RUN seed=SEED ...` (resumed when a partial one exists);
4. the HoC / PubMedQA baselines (`modelzoo.downstream.baselines`) into `runs/E/baselines.json`;
5. the report: tables, plots and the wall time of each stage, between the markers of `docs/results.md` (the text
   outside them is kept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # the benchmarks' environment description and section writer

from common import environment  # noqa: E402

from modelzoo.checkpoint import latest_checkpoint  # noqa: E402
from modelzoo.config import load_config, to_object  # noqa: E402
from modelzoo.config.experiment import ExperimentConfig, StageConfig  # noqa: E402
from modelzoo.config.finetune import default_data_dir  # noqa: E402
from modelzoo.downstream.baselines import all_baselines  # noqa: E402
from modelzoo.experiments.results import Run, baselines_table, plot_results, read_json, results_table  # noqa: E402

BEGIN, END = "<!-- scripts/reproduce.py: begin -->", "<!-- scripts/reproduce.py: end -->"


def modelzoo(*args: str) -> None:
    print("+ modelzoo", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "modelzoo", *args], check=True)


class Timings:
    """Wall seconds of each stage, summed over the invocations that did its work (`runs/E/timings.json`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = read_json(path) or {}

    def run(self, stage: str, *args: str) -> None:
        start = time.perf_counter()
        modelzoo(*args)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.seconds, indent=2) + "\n")


def sweep_sparsities(budget: str, sparsities: list[str]) -> list[str]:
    """Equal FLOPs has no dense run of its own: it is the equal-steps dense run."""
    return [s for s in sparsities if budget == "steps" or s != "dense"]


def sweep_runs(experiment: str, budget: str, sparsities: list[str], seeds: list[int]) -> list[tuple[str, int, Path]]:
    """(sparsity, seed, run_dir) of every job of a sweep, its run_dir from the composed config."""
    runs = []
    for sparsity in sweep_sparsities(budget, sparsities):
        for seed in seeds:
            overrides = [f"experiment={experiment}", f"task.budget={budget}", f"sparsity={sparsity}", f"seed={seed}"]
            runs.append((sparsity, seed, Path(load_config(overrides).run_dir)))
    return runs


def pretrain(timings: Timings, experiment: str, budget: str, sparsities: list[str], seeds: list[int]) -> None:
    runs = sweep_runs(experiment, budget, sparsities, seeds)
    if all((run_dir / "summary.json").is_file() for _, _, run_dir in runs):
        return
    timings.run(
        f"pretrain, task.budget={budget}",
        "pretrain", "-m", f"experiment={experiment}", f"task.budget={budget}",
        "sparsity=" + ",".join(sweep_sparsities(budget, sparsities)), "seed=" + ",".join(map(str, seeds)),
    )  # fmt: skip


def downstream(timings: Timings, stage: StageConfig, sparsity: str, seed: int, run_dir: Path) -> None:
    output = run_dir / stage.name
    if (stage.sparse_only and sparsity == "dense") or (output / "summary.json").is_file():
        return
    resume = ["task.resume=true"] if latest_checkpoint(output) is not None else []
    timings.run(stage.name, stage.task, f"task.pretrained={run_dir}", f"seed={seed}", *stage.overrides(), *resume)


def report(experiment: ExperimentConfig, args: argparse.Namespace, root: Path) -> str:
    runs = [
        Run.read(budget, sparsity, seed, run_dir, experiment.stages)
        for budget in args.budgets
        for sparsity, seed, run_dir in sweep_runs(experiment.name, budget, args.sparsities, args.seeds)
    ]
    baselines = read_json(root / "baselines.json") or []
    timings = read_json(root / "timings.json") or {}
    plots = []
    for stage in experiment.stages:
        if stage.dataset == "hoc" and stage.sparsity == "dense":
            path = args.results.parent / f"results_{experiment.name}.png"
            plots.append(plot_results(runs, stage, baselines, path).relative_to(args.results.parent))
    env = environment()
    seeds = ",".join(map(str, args.seeds))
    lines = [
        BEGIN,
        f"## {experiment.name}: {len(args.seeds)} seeds ({seeds}), written by `python scripts/reproduce.py`",
        "",
        *(f"- {key}: {value}" for key, value in env.items() if not key.startswith("load")),
        "- device: cpu (no GPU was lent to this session)",
        "- wall time of each stage (seconds, summed over the sweep's jobs):",
        *(f"  - {stage}: {seconds:,.0f} s ({seconds / 60:.1f} min)" for stage, seconds in timings.items()),
        f"  - total: {sum(timings.values()):,.0f} s ({sum(timings.values()) / 3600:.2f} h)",
        "",
        "Each cell: mean ± sample standard deviation over the seeds (n). Test scores: HoC BLURB F1 (pooled micro),",
        "PubMedQA accuracy on the 500 test questions; each fine-tuning run's best dev step is scored on test.",
        "",
        results_table(runs, experiment.stages),
        "",
        "Baselines on the same splits:",
        "",
        baselines_table(baselines),
        "",
        *(f"![{experiment.name}: loss, HoC F1 and learning curve]({p})" for p in plots),
        END,
    ]
    return "\n".join(lines)


def write_report(text: str, path: Path) -> None:
    """Replace the generated block of `path` (or put it first), keeping the hand-written text around it."""
    old = path.read_text() if path.is_file() else "# Results\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="spdf_tiny", help="a conf/experiment option (default: spdf_tiny)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: 1,2,3)")
    parser.add_argument("--sparsities", default="dense,static_50,static_75,rigl_75", help="sparsity options")
    parser.add_argument("--budgets", default="steps,dense_flops", help="task.budget values to sweep")
    parser.add_argument("--downstream", default="steps", help="budgets whose runs get the downstream stages")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md", help="the report file")
    parser.add_argument("--report-only", action="store_true", help="only the report, from the finished runs")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sparsities, args.budgets = args.sparsities.split(","), args.budgets.split(",")
    downstream_budgets = args.downstream.split(",") if args.downstream else []
    experiment = to_object(load_config([f"experiment={args.experiment}"])).experiment
    root = Path("runs") / experiment.name  # run_dir is relative to the working directory, as for modelzoo
    if not args.report_only:
        timings = Timings(root / "timings.json")
        for budget in args.budgets:
            pretrain(timings, experiment.name, budget, args.sparsities, args.seeds)
        for budget in downstream_budgets:
            for sparsity, seed, run_dir in sweep_runs(experiment.name, budget, args.sparsities, args.seeds):
                for stage in experiment.stages:
                    downstream(timings, stage, sparsity, seed, run_dir)
        if not (root / "baselines.json").is_file():
            baselines = all_baselines(default_data_dir("hoc"), default_data_dir("pubmedqa"))
            (root / "baselines.json").write_text(json.dumps(baselines, indent=2) + "\n")
    text = report(experiment, args, root)
    write_report(text, args.results)
    print(text)


if __name__ == "__main__":
    main()

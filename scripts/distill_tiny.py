"""Sparse continued pre-training of `llama_tiny` with and without distillation at equal tokens (docs/recipes.md).

    python scripts/distill_tiny.py                 # runs what is missing under runs/distill, prints the table
    python scripts/distill_tiny.py --seeds 0 1 2   # more seeds of the two continued runs

1. pre-train a dense `llama_tiny` on the shipped abstracts for `DENSE_STEPS` steps (the teacher);
2. prune it one-shot to 50% with SparseGPT (`modelzoo prune`);
3. continue pre-training the pruned model sparse (masks from its zeros) for `CONTINUED_STEPS` steps, once with the LM
   loss alone and once distilled from the dense model (`task.distill.teacher`, SquareHead's defaults), per seed.

Each stage is skipped when its output exists, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path("runs/distill")
DENSE_STEPS = 200
CONTINUED_STEPS = 60
MODEL = ("model=llama_tiny",)


def modelzoo(*args: str) -> None:
    print("+ modelzoo", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "modelzoo", *args], check=True)


def continued_dir(distilled: bool, seed: int) -> Path:
    return ROOT / f"sparsegpt50-{'distilled' if distilled else 'lm'}-seed{seed}"


def run_stages(seeds: list[int]) -> None:
    dense = ROOT / "dense"
    if not (dense / "summary.json").is_file():
        modelzoo("pretrain", *MODEL, "sparsity=dense", f"run_dir={dense}", f"task.max_steps={DENSE_STEPS}")
    pruned = dense / "pruned" / "sparsegpt-50"
    if not (pruned / "config.json").is_file():
        modelzoo("prune", *MODEL, f"run_dir={dense}", "task.method=sparsegpt", "task.sparsity=0.5")
    for seed in seeds:
        for distilled in (False, True):
            run = continued_dir(distilled, seed)
            if (run / "summary.json").is_file():
                continue
            teacher = [f"task.distill.teacher={dense / 'hf'}"] if distilled else []
            modelzoo(
                "pretrain",
                *MODEL,
                f"task.init_from={pruned}",
                "sparsity.sparsity=0.5",
                "sparsity.init_method=from_weights",
                f"task.max_steps={CONTINUED_STEPS}",
                f"seed={seed}",
                f"run_dir={run}",
                *teacher,
            )


def val_loss(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["val_loss"]


def table(seeds: list[int]) -> str:
    dense = val_loss(ROOT / "dense")
    lines = [
        f"dense llama_tiny ({DENSE_STEPS} steps): validation loss {dense:.4f}",
        f"| continued {CONTINUED_STEPS} steps from SparseGPT 50% | validation loss | gap to dense | seeds |",
        "|---|---|---|---|",
    ]
    for distilled in (False, True):
        losses = [val_loss(continued_dir(distilled, seed)) for seed in seeds]
        spread = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
        name = "distilled (SquareHead defaults)" if distilled else "LM loss alone"
        mean = statistics.mean(losses)
        lines.append(f"| {name} | {mean:.4f}{spread} | {mean - dense:+.4f} | {len(losses)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        run_stages(args.seeds)
    print(table(args.seeds))


if __name__ == "__main__":
    main()

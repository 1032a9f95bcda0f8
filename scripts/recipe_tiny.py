"""The small end-to-end MediSwift recipe of `docs/recipes.md`, on the tiny model, and its results table.

    python scripts/recipe_tiny.py                  # runs what is missing under runs/recipe, prints the table
    python scripts/recipe_tiny.py --table-only     # only the table, from the runs' summary.json files

Stages, each a `modelzoo` command, skipped when its output already exists (so an interrupted recipe resumes):
1. pre-train tiny dense and tiny 75% static-sparse, the default `modelzoo pretrain` run shape (16 x 128 tokens
   per step) for `PRETRAIN_STEPS` steps (the default 400 take over 30 minutes each on the loaded 2-core machine);
2. dense fine-tuning of each on PubMedQA (masks dropped: SPDF), best step on fold-0 dev, scored on test;
3. soft prompting of each (20 virtual tokens, backbone frozen), the same selection and test;
4. `modelzoo evaluate` of both pre-trained checkpoints (zero-shot) and both fine-tuned HF exports: a
   cross-check of the fine-tuning runs' own test numbers by the independent evaluator;
5. HoC fine-tuning of the sparse run, dense (SPDF) and keeping its masks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path("runs/recipe")
SPARSITIES = ("dense", "static_75")
MAJORITY = 0.552  # always "yes" on the 500 PubMedQA test questions
PRETRAIN_STEPS = 100
FINETUNE = ["task.max_steps=100", "task.eval_every=25"]


def modelzoo(*args: str) -> None:
    print("+ modelzoo", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "modelzoo", *args], check=True)


def pretrain_dir(sparsity: str) -> Path:
    return ROOT / f"tiny-{sparsity}"


def run_stages() -> None:
    for sparsity in SPARSITIES:
        pre = pretrain_dir(sparsity)
        if not (pre / "summary.json").is_file():
            modelzoo("pretrain", f"sparsity={sparsity}", f"run_dir={pre}", f"task.max_steps={PRETRAIN_STEPS}")
        for task in ("finetune", "prompt_tune"):
            mode = "dense" if task == "finetune" else "keep"
            if not (pre / f"{task}-pubmedqa-{mode}" / "summary.json").is_file():
                modelzoo(task, f"task.pretrained={pre}", f"task.sparsity={mode}", *FINETUNE)
    for mode in ("dense", "keep"):
        if not (pretrain_dir("static_75") / f"finetune-hoc-{mode}" / "summary.json").is_file():
            pre = pretrain_dir("static_75")
            modelzoo("finetune", f"task.pretrained={pre}", f"task.sparsity={mode}", "task.dataset=hoc", *FINETUNE)
    if not (ROOT / "evaluate" / "results.json").is_file():
        checkpoints = ",".join(str(pretrain_dir(s)) for s in SPARSITIES)
        finetuned = ",".join(str(pretrain_dir(s) / "finetune-pubmedqa-dense" / "hf") for s in SPARSITIES)
        modelzoo(
            "evaluate",
            f"task.checkpoints=[{checkpoints}]",
            f"task.hf_dirs=[{finetuned}]",
            f"task.output_dir={ROOT / 'evaluate'}",
        )


def _results() -> list[dict]:
    return json.loads((ROOT / "evaluate" / "results.json").read_text())


def _flops(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP"


def table() -> str:
    rows = [
        "| pre-training | stage | PubMedQA test accuracy (zero-shot: `modelzoo evaluate`; else the run's, in "
        "brackets `evaluate` on its export) | majority baseline | macro-F1 | training FLOPs "
        "(pre-training sparse-effective + this stage) | trainable parameters |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for sparsity in SPARSITIES:
        pre = pretrain_dir(sparsity)
        summary = json.loads((pre / "summary.json").read_text())
        pre_flops = summary["sparse_flops"]
        results = ROOT / "evaluate" / "results.json"
        evaluated = {r["source"]: r for r in _results()} if results.is_file() else {}
        zero = next((r for r in evaluated.values() if r["kind"] == "checkpoint" and r["model"] == pre.name), None)
        if zero is not None:
            rows.append(
                f"| {sparsity} | zero-shot | {zero['accuracy']:.1%} | {MAJORITY:.1%} | {zero['macro_f1']:.3f} | "
                f"{_flops(pre_flops)} | 0 |"
            )
        for task, mode, label in (("finetune", "dense", "dense fine-tuning"), ("prompt_tune", "keep", "soft prompt")):
            path = pre / f"{task}-pubmedqa-{mode}" / "summary.json"
            if not path.is_file():
                continue
            s = json.loads(path.read_text())
            check = evaluated.get(s["exports"].get("hf", ""))  # the same model scored by `modelzoo evaluate`
            accuracy = f"{s['test']['accuracy']:.1%}" + (f" ({check['accuracy']:.1%})" if check else "")
            rows.append(
                f"| {sparsity} | {label} (best dev step {s['best_step']}) | {accuracy} | "
                f"{MAJORITY:.1%} | {s['test']['macro_f1']:.3f} | {_flops(pre_flops)} + "
                f"{_flops(s['finetune_flops'])} | {s['trainable_params']:,} |"
            )
    return "\n".join(rows)


def hoc_table() -> str:
    rows = [
        "| pre-training | stage | HoC test F1 (BLURB: pooled micro) | per-hallmark macro-F1 | threshold (dev) "
        "| dev F1 | stage FLOPs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in ("dense", "keep"):
        path = pretrain_dir("static_75") / f"finetune-hoc-{mode}" / "summary.json"
        if path.is_file():
            s = json.loads(path.read_text())
            t = s["test"]
            rows.append(
                f"| static_75 | fine-tuning, {mode} (best dev step {s['best_step']}) | {t['f1']:.3f} | "
                f"{t['macro_f1']:.3f} | {t['threshold']:.2f} | {s['dev']['f1']:.3f} | {_flops(s['finetune_flops'])} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table-only", action="store_true", help="print the table of the finished runs only")
    args = parser.parse_args()
    if not args.table_only:
        run_stages()
    print(table(), hoc_table(), sep="\n\n")


if __name__ == "__main__":
    main()

"""The FSDP2 part of the GPU check, `python bench/gpu.py --fsdp`: training runs under torchrun, into docs/benchmarks.md.

Each run is `modelzoo pretrain task.parallelism=fsdp` (the trainer's own FSDP2 path, nothing rebuilt here) started by
`torchrun --standalone --nproc_per_node=N`, dense and masked-dense static 75%; tokens/s, MFU and peak memory come from
the run's metrics.csv and stand beside what `modelzoo info task.parallelism=fsdp --gpus=N` plans per GPU.
What is measured, and why one GPU is not enough, is in `METHOD`, which also heads the section this writes.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from common import REPO, Shape, markdown_table, publish

from modelzoo.config import load_config, to_object
from modelzoo.memory import GIB, memory_plan
from modelzoo.train.mfu import format_fraction

METHOD = """\
Each row is one `modelzoo pretrain task.parallelism=fsdp` run under `torchrun --standalone --nproc_per_node=N` on the
shipped PubMed sample (its BPE tokenizer, trained first), from the same seed: `fully_shard` per block and on the root
as the trainer applies it, bf16 compute weights with fp32 master weights and fp32 gradient reduction under
`task.precision=bf16`, AdamW, eager (`task.compile=false`: the compile minute per run would cost more than the steps),
one micro-batch per optimizer step on each rank (`task.batch_size` = micro-batch x N), a log row every step. tokens/s
(all ranks together) and MFU are the medians of the logged steps after the first two, peak memory is rank 0's largest
`torch.cuda.max_memory_allocated` of those steps (metrics.csv `peak_mem_gib`), and the plan is `modelzoo.memory`'s total
per GPU for the same config and N. On CUDA N is every visible GPU; it needs two or more: NCCL refuses two ranks on one
GPU, and in a world of one the trainer shards nothing (FSDP2 is applied under torchrun with 2 or more ranks), so on a
one-GPU machine nothing runs and the section says so. On CPU N = 2 gloo ranks: a check that the path works, not a
speed worth comparing.
"""
SECTION_GPU = "GPU {device} x {ranks}: FSDP2 training, dense vs masked-dense static 75% (bench/gpu.py --fsdp)"
SECTION_CPU = "FSDP2 on CPU, 2 gloo ranks: dense vs masked-dense static 75% (bench/gpu.py --fsdp --device cpu)"
GPU_MODEL = "llama3_1b"
CPU_MODEL = "llama_tiny"
SPARSITIES = ("dense", "static_75")
CPU_RANKS = 2
WARMUP_STEPS = 2  # logged steps left out of the medians (first all-gathers, allocator growth)
RUN_TIMEOUT_S = 600


@dataclass(frozen=True)
class RunResult:
    """What one run's metrics.csv says after its warm-up steps, and what the plan says per GPU."""

    tokens_per_s: float
    mfu: float | None
    peak_memory_gib: float | None
    planned_gib: float


def ranks(device: torch.device) -> int:
    """Ranks to start: one per visible GPU, or `CPU_RANKS` gloo processes on CPU."""
    return torch.cuda.device_count() if device.type == "cuda" else CPU_RANKS


def overrides(
    model: str, sparsity: str, shape: Shape, device: torch.device, precision: str, n: int, steps: int, work: Path
) -> list[str]:
    """The `modelzoo pretrain` overrides of one run: `n` ranks, `steps` steps, everything written under `work`."""
    return [
        f"model={model}",
        f"sparsity={sparsity}",
        "task.parallelism=fsdp",
        f"task.device={device.type}",
        f"task.precision={precision}",
        f"data.seq_len={shape.seq}",
        f"data.cache_dir={work / 'cache'}",
        f"task.micro_batch_size={shape.batch}",
        f"task.batch_size={shape.batch * n}",
        f"task.max_steps={steps}",
        "task.log_every=1",
        f"task.eval_every={steps}",
        "task.eval_batches=1",
        f"task.checkpoint_every={steps}",
        "task.export=false",
        "task.compile=false",
        "optim.warmup_steps=1",
        f"run_dir={work / sparsity}",
    ]


def command(n: int, run_overrides: list[str]) -> list[str]:
    """torchrun starting `n` ranks of `modelzoo pretrain` on this machine."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return [*torchrun, "-m", "modelzoo", "pretrain", *run_overrides]


def read_metrics(run_dir: Path) -> tuple[float, float | None, float | None]:
    """(median tokens/s, median MFU or None, largest peak memory GiB or None) of the logged steps after the warm-up."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["tokens_per_s"] and int(r["step"]) > WARMUP_STEPS]
    if not rows:
        raise RuntimeError(f"{run_dir / 'metrics.csv'} has no logged step after step {WARMUP_STEPS}")
    mfus = [float(r["mfu"]) for r in rows if r["mfu"]]
    peaks = [float(r["peak_mem_gib"]) for r in rows if r["peak_mem_gib"]]
    return (
        statistics.median(float(r["tokens_per_s"]) for r in rows),
        statistics.median(mfus) if mfus else None,
        max(peaks) if peaks else None,
    )


def planned_gib(run_overrides: list[str], n: int) -> float:
    """GiB per GPU `modelzoo.memory` plans for the run's config over `n` GPUs (one micro-batch per step)."""
    cfg = to_object(load_config(run_overrides))
    t = cfg.task
    plan = memory_plan(cfg.model, cfg.sparsity, t.precision, t.micro_batch_size, cfg.data.seq_len, fsdp_gpus=n)
    return plan.total / GIB


def run(run_overrides: list[str], n: int) -> RunResult:
    """One torchrun job; its failure raises with the tail of its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Its own session; on a timeout torchrun is asked to stop (SIGTERM: it stops its ranks, which run in sessions of
    # their own), then killed with anything left in its session.
    job = subprocess.Popen(
        command(n, run_overrides), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = job.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGTERM)
        try:
            stdout, stderr = job.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            stdout, stderr = job.communicate()
        raise RuntimeError(f"torchrun still running after {RUN_TIMEOUT_S} s, killed:\n{stderr[-3000:]}") from None
    if job.returncode != 0:
        raise RuntimeError(f"torchrun exited {job.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    run_dir = Path(next(o.split("=", 1)[1] for o in run_overrides if o.startswith("run_dir=")))
    return RunResult(*read_metrics(run_dir), planned_gib(run_overrides, n))


def report(model: str, shape: Shape, n: int, steps: int, results: dict[str, RunResult]) -> str:
    """The section's table and the static-vs-dense line."""
    dense = results["dense"].tokens_per_s
    rows = [
        [
            sparsity,
            f"{r.tokens_per_s:,.0f}",
            format_fraction(r.mfu),
            "n/a" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f}",
            f"{r.planned_gib:.1f}",
            f"{r.tokens_per_s / dense:.3f}",
        ]
        for sparsity, r in results.items()
    ]
    header = ["sparsity", "tokens/s (all ranks)", "MFU", "peak memory GiB (rank 0)", "plan GiB per GPU", "vs dense"]
    static = results["static_75"].tokens_per_s / dense - 1
    return "\n".join(
        [
            f"### {model}: {n} ranks, micro-batch {shape.batch} x seq {shape.seq} per rank, {steps} steps per run",
            "",
            markdown_table(header, rows),
            "",
            f"- masked-dense static 75% tokens/s vs dense under FSDP2: **{static:+.1%}**",
        ]
    )


def main(args: argparse.Namespace, shape: Shape, env: dict[str, str]) -> int:
    """`bench/gpu.py --fsdp`: the runs, the report, and the section (with `--write`)."""
    device = torch.device(args.device)
    n = ranks(device)
    model = args.model[0]
    steps = WARMUP_STEPS + (args.steps or shape.steps)
    env["ranks"] = str(n)
    section = SECTION_GPU.format(device=env.get("device", "cpu"), ranks=n) if device.type == "cuda" else SECTION_CPU
    if n < 2:
        text = f"{n} GPU visible: no FSDP2 run (it needs 2 or more; see the method)."
        print(text, flush=True)
        publish(section, f"{METHOD.strip()}\n\n{text}", env, args.write)
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as work:
        for sparsity in SPARSITIES:
            run_overrides = overrides(model, sparsity, shape, device, args.precision, n, steps, Path(work))
            print(" ".join(command(n, run_overrides)), flush=True)
            results[sparsity] = run(run_overrides, n)
            print(f"{model} {sparsity}: {results[sparsity]}", flush=True)
    text = report(model, shape, n, steps, results)
    print(text, flush=True)
    publish(section, f"{METHOD.strip()}\n\n{text}", env, args.write)
    return 0

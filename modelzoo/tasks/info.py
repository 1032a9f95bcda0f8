"""`modelzoo info` (parameter counts and the memory a GPU needs: a DDP replica, or one GPU of an FSDP2 job) and
`modelzoo flops` (training FLOPs)."""

from __future__ import annotations

from modelzoo.config.train import resolved_precision
from modelzoo.errors import ModelZooError
from modelzoo.flops import flop_report, format_report
from modelzoo.memory import format_memory_plan, memory_plan
from modelzoo.report import format_model_info
from modelzoo.train.budget import resolved
from modelzoo.train.distill import teacher_config
from modelzoo.validate import validated_config

USAGE = "usage: modelzoo info [--gpus=N] [overrides]"
FSDP_GPUS = 8  # `--gpus` when not given: one node of 8


def gpus_flag(flags: list[str]) -> int | None:
    """`--gpus=N` (the GPUs an FSDP2 job shards over: torchrun's world size), or None when not given."""
    unknown = [f for f in flags if not f.startswith("--gpus=")]
    if unknown:
        raise ModelZooError(f"unknown flag {unknown[0]}; {USAGE}")
    if not flags:
        return None
    value = flags[-1].split("=", 1)[1]
    if not value.isdigit() or int(value) < 1:
        raise ModelZooError(f"--gpus={value}: give the number of GPUs as a whole number >= 1, e.g. --gpus=8")
    return int(value)


def info(args: list[str]) -> None:
    """`modelzoo info [--gpus=N] [overrides]`: under `task.parallelism=fsdp` the memory plan is per GPU of N (default
    8); under ddp each GPU holds a whole replica and `--gpus` is refused."""
    gpus = gpus_flag([a for a in args if a.startswith("--")])
    cfg = validated_config([a for a in args if not a.startswith("--")])
    print(format_model_info(cfg.model, cfg.sparsity))
    t = cfg.task
    if t.parallelism != "fsdp" and gpus is not None:
        raise ModelZooError(
            f"--gpus={gpus} sets the GPUs FSDP2 shards over; with task.parallelism={t.parallelism} every GPU holds a "
            "whole replica: add task.parallelism=fsdp, or leave --gpus out"
        )
    fsdp_gpus = (gpus or FSDP_GPUS) if t.parallelism == "fsdp" else None
    precision = resolved_precision(t.precision, cfg.cluster.target)
    teacher = teacher_config(t.distill.teacher) if t.distill.enabled else None
    plan = memory_plan(
        cfg.model,
        cfg.sparsity,
        precision,
        t.micro_batch_size,
        cfg.data.seq_len,
        teacher,
        t.distill.hidden_weight != 0,
        fsdp_gpus,
    )
    print(format_memory_plan(plan))


def flops(overrides: list[str]) -> None:
    cfg = resolved(validated_config(overrides))
    tokens = cfg.task.max_steps * cfg.task.batch_size * cfg.data.seq_len
    report = flop_report(cfg.model, cfg.data.seq_len, cfg.sparsity, steps=cfg.task.max_steps)
    print(format_report(report, tokens=tokens))

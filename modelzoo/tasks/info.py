"""`modelzoo info` (parameter counts and the memory a DDP replica needs) and `modelzoo flops` (training FLOPs)."""

from __future__ import annotations

from modelzoo.config.train import resolved_precision
from modelzoo.flops import flop_report, format_report
from modelzoo.memory import format_memory_plan, memory_plan
from modelzoo.report import format_model_info
from modelzoo.train.budget import resolved
from modelzoo.train.distill import teacher_config
from modelzoo.validate import validated_config


def info(overrides: list[str]) -> None:
    cfg = validated_config(overrides)
    print(format_model_info(cfg.model, cfg.sparsity))
    t = cfg.task
    precision = resolved_precision(t.precision, cfg.cluster.target)
    teacher = teacher_config(t.distill.teacher) if t.distill.enabled else None
    plan = memory_plan(
        cfg.model, cfg.sparsity, precision, t.micro_batch_size, cfg.data.seq_len, teacher, t.distill.hidden_weight != 0
    )
    print(format_memory_plan(plan))


def flops(overrides: list[str]) -> None:
    cfg = resolved(validated_config(overrides))
    tokens = cfg.task.max_steps * cfg.task.batch_size * cfg.data.seq_len
    report = flop_report(cfg.model, cfg.data.seq_len, cfg.sparsity, steps=cfg.task.max_steps)
    print(format_report(report, tokens=tokens))

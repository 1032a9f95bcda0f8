"""AdamW and the learning-rate schedule (linear warm-up, then cosine or linear decay to a floor)."""

from __future__ import annotations

import math

import torch
from torch import nn

from modelzoo.config.train import OptimConfig


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, adamw: type[torch.optim.Optimizer] = torch.optim.AdamW, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW (`adamw`: torch's or cstorch's) with weight decay on matrices only (not on biases, norms' gains or
    1-D parameters); `fused`: torch's single-kernel implementation (`modelzoo.train.accel.fuses_adamw`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **({"fused": True} if fused else {}))


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))

"""Our learning-rate schedule (`modelzoo.optim.lr_factor`) as `cstorch.optim.lr_scheduler` objects.

torch's `LambdaLR` writes a Python float into the param groups, which a CS-2 traces once per execution: it would
train at a constant LR. cstorch's schedulers compute the LR in the program from their step counter
(`last_epoch`, a device tensor), so the CS-2 follows the schedule. With W warm-up steps, T = max_steps, peak lr
and floor r * lr, the LR at step s is exactly `lr * lr_factor(s)`:

    warm-up  LinearLR(lr / W -> lr, total_iters=W - 1)      (ConstantLR(lr) for W = 1; none for W = 0)
    decay    CosineDecayLR | LinearLR (lr -> r * lr, total_iters=T - W) | ConstantLR(lr)
    joined   SequentialLR([warm-up, decay], milestones=[W])

(`LinearLR` holds its end value from `total_iters` on, `CosineDecayLR` clamps its step there, as `lr_factor`
clamps its progress at 1.)
"""

from __future__ import annotations

from typing import Any

from modelzoo.backends.cerebras.environment import import_cstorch
from modelzoo.config.train import OptimConfig


def build_scheduler(optimizer: Any, cfg: OptimConfig, max_steps: int) -> Any:
    """The cstorch scheduler of `cfg`'s schedule over `max_steps` for a cstorch `optimizer`."""
    schedulers = import_cstorch().optim.lr_scheduler
    lr, warm = cfg.lr, cfg.warmup_steps
    span = max(1, max_steps - warm)
    if cfg.decay == "constant":
        decay = schedulers.ConstantLR(optimizer, learning_rate=lr)
    else:
        kind = schedulers.CosineDecayLR if cfg.decay == "cosine" else schedulers.LinearLR
        decay = kind(optimizer, initial_learning_rate=lr, end_learning_rate=cfg.min_lr_ratio * lr, total_iters=span)
    if warm == 0:
        return decay
    if warm == 1:
        warmup = schedulers.ConstantLR(optimizer, learning_rate=lr)
    else:
        warmup = schedulers.LinearLR(
            optimizer, initial_learning_rate=lr / warm, end_learning_rate=lr, total_iters=warm - 1
        )
    return schedulers.SequentialLR(optimizer, schedulers=[warmup, decay], milestones=[warm])

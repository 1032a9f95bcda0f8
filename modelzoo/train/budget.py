"""How long a pre-training run trains and whether it continues, resolved once before it starts.

- `task.budget=dense_flops`: `task.max_steps` names a dense run's length; the run trains as many steps as spend
  the same sparse-effective training FLOPs (`modelzoo.flops.iso_flop_steps`), the iso-FLOP comparison of SPDF's
  discussion and Sparse-IFT. The resolved config has the step count and `budget: steps`, so a saved config means
  what it trained.
- `task.auto_resume=true`: resume when the run directory holds a checkpoint, else start; a rerun sweep continues
  its interrupted runs and finds its finished ones finished.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from modelzoo.checkpoint import latest_checkpoint
from modelzoo.config import Config
from modelzoo.config.train import resolved_precision
from modelzoo.flops import iso_flop_steps

log = logging.getLogger(__name__)


def trained_steps(cfg: Config) -> int:
    """The optimizer steps pre-training run `cfg` trains: `task.max_steps`, or under `task.budget=dense_flops` the
    steps that spend the training FLOPs of that many dense steps."""
    if cfg.task.budget == "dense_flops":
        return iso_flop_steps(cfg.model, cfg.data.seq_len, cfg.sparsity, cfg.task.max_steps)
    return cfg.task.max_steps


def resolved(cfg: Config, run_dir: str | Path | None = None) -> Config:
    """`cfg` with `task.budget` turned into `task.max_steps`, `task.auto_resume` into `task.resume` and
    `task.precision=auto` into the cluster's precision."""
    task = replace(cfg.task, precision=resolved_precision(cfg.task.precision, cfg.cluster.target))
    if task.budget == "dense_flops":
        steps = trained_steps(cfg)
        if steps != task.max_steps:
            log.info(f"task.budget=dense_flops: the FLOPs of {task.max_steps:,} dense steps buy {steps:,} steps here")
        task = replace(task, max_steps=steps, budget="steps")
    if task.auto_resume and not task.resume and latest_checkpoint(run_dir or cfg.run_dir) is not None:
        log.info(f"task.auto_resume: continuing {run_dir or cfg.run_dir}")
        task = replace(task, resume=True)
    return replace(cfg, task=task)

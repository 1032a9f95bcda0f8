"""The `experiment` node: an experiment's name and the downstream stages that follow each pre-training run.

`conf/experiment/<name>.yaml` (a `@package _global_` option) fixes model, data, schedule and sparsity defaults of
the pre-training runs; its `experiment.stages` list the fine-tuning runs made from each one
(`scripts/reproduce.py` turns every stage into a `modelzoo finetune` / `modelzoo prompt_tune` command).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelzoo.config.finetune import run_name

STAGE_TASKS = ("finetune", "prompt_tune")


@dataclass
class StageConfig:
    """One downstream run per pre-trained run: `task` on `dataset` with `sparsity` dense (SPDF) or keep; the other
    keys are those of `task=finetune` (`lr: null`: the task's default). `sparse_only`: only for sparse runs (keeping
    the masks of a dense run is dense fine-tuning again)."""

    task: str = "finetune"
    dataset: str = "hoc"
    sparsity: str = "dense"
    max_steps: int = 200
    eval_every: int = 50
    batch_size: int = 8
    lr: float | None = None
    sparse_only: bool = False

    @property
    def name(self) -> str:
        """The stage's output directory under the pre-trained run (`modelzoo.config.finetune.output_dir`)."""
        return run_name(self.task, self.dataset, self.sparsity)

    def overrides(self) -> list[str]:
        """The stage as `modelzoo <task>` overrides, without `task.pretrained` and `seed`."""
        lr = [] if self.lr is None else [f"task.lr={self.lr}"]
        return [
            f"task.dataset={self.dataset}",
            f"task.sparsity={self.sparsity}",
            f"task.max_steps={self.max_steps}",
            f"task.eval_every={self.eval_every}",
            f"task.batch_size={self.batch_size}",
            f"task.micro_batch_size={self.batch_size}",
            *lr,
        ]


@dataclass
class ExperimentConfig:
    """`name` is empty outside an experiment."""

    name: str = ""
    stages: list[StageConfig] = field(default_factory=list)

"""Configs for the optimizer and the pre-training loop (Hydra `optim` and `task=pretrain`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DECAYS = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "cbf16", "fp16")
AUTO_PRECISION = "auto"  # pre-training's default: see `resolved_precision`
# cstorch's 16-bit types with loss scaling: a CS-2 only (backend=cerebras cluster=cs2 pretraining).
CS2_PRECISIONS = ("cbf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE_POLICIES = ("stop", "skip")  # see modelzoo.train.guards
# How long a run trains: `steps`: task.max_steps; `dense_flops`: as many steps as spend the sparse-effective
# training FLOPs that task.max_steps dense steps would (an iso-FLOP comparison; modelzoo.train.budget).
BUDGETS = ("steps", "dense_flops")
PARALLELISMS = ("ddp", "fsdp")  # data parallelism under torchrun: whole replicas, or FSDP2-sharded


def resolved_device(requested: str) -> str:
    """`task.device` with `auto` resolved: cuda when a CUDA device is visible, else cpu."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolved_precision(requested: str, cluster_target: str) -> str:
    """`task.precision` with `auto` resolved by the cluster: bf16 on a CS-2 (`cluster.target=CSX`), as the Model
    Zoo defaults to (cstorch's CSX backend always runs mixed precision: its "fp32" is float16 without loss
    scaling), fp32 everywhere else."""
    if requested == AUTO_PRECISION:
        return "bf16" if cluster_target == "CSX" else "fp32"
    return requested


@dataclass
class OptimConfig:
    """AdamW with Cerebras' GPT-3 defaults; linear warm-up, then decay to `min_lr_ratio` of the peak."""

    name: str = "adamw"
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 40
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    fused: bool | None = None  # torch's fused AdamW kernel; null: on CUDA (modelzoo.train.accel)


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher during (sparse continued) pre-training (`task.distill`).

    The loss is `lm_weight` x the LM loss + `logit_weight` x the logit term + `hidden_weight` x SquareHead's hidden
    term (Kurtic et al. 2023, arXiv 2310.06927; `modelzoo.train.distill`). The defaults are SquareHead's as
    llm-compressor's `OutputDistillationModifier` ran it (before its removal in 2025-11): the task loss at weight 1,
    the per-layer normalised hidden-state MSE averaged over layers and scaled by the number of layers (the paper's
    sum over layers), plus the KL of the token distributions at temperature 1, weight 1.
    """

    teacher: str | None = None  # an HF GPT-2 / Llama directory, or one of our runs or checkpoints; null: off
    temperature: float = 1.0  # of both softmaxes in the logit term, which is scaled by temperature^2
    lm_weight: float = 1.0
    logit_weight: float = 1.0
    hidden_weight: float | None = None  # null: the student's number of layers (SquareHead's sum over layers)

    @property
    def enabled(self) -> bool:
        return self.teacher is not None


@dataclass
class TrainConfig:
    """The pre-training loop. `batch_size` sequences per optimizer step, in micro-batches of `micro_batch_size`."""

    name: str = "pretrain"
    max_steps: int = 400
    batch_size: int = 16
    micro_batch_size: int = 16
    precision: str = AUTO_PRECISION  # fp32, or bf16 on a CS-2 (`resolved_precision`)
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    auto_resume: bool = False  # continue run_dir's latest checkpoint when it has one, else start (sweeps rerun)
    budget: str = "steps"  # one of BUDGETS
    init_from: str | None = None
    export: bool = True
    on_nonfinite: str = "stop"  # a NaN/Inf loss or gradient norm: "stop" the run, or "skip" the update
    max_nonfinite_skips: int = 10  # "skip": the most steps left out over the run before it stops
    compile: bool | None = None  # torch.compile the model; null: on CUDA, off on CPU (modelzoo.train.accel)
    activation_checkpointing: bool = False  # recompute each block in the backward pass instead of keeping it
    peak_tflops: float | None = None  # the device's dense peak for MFU; null: from the table in train/mfu.py
    parallelism: str = "ddp"  # one of PARALLELISMS; matters under torchrun only
    distill: DistillConfig = field(default_factory=DistillConfig)

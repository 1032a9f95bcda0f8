"""The one way a training run is built (pre-training, fine-tuning, soft prompting), as torchtitan's one
`Pretraining.__init__`: `open_run` claims the device and the run directory; `assemble_loop` builds the optimizer and
schedule, the loop's settings and config record, writes the tokenizer of a new run and resumes an old one.

A task brings what is its own (data, model, loss, evaluation, summary) and hands the parts to these two steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import PreTrainedTokenizerBase

from modelzoo import checkpoint as ckpt
from modelzoo import runlock
from modelzoo.backends.base import Backend, Sparsifier
from modelzoo.config import Config
from modelzoo.config.train import OptimConfig, resolved_device
from modelzoo.distributed import Distributed, init_distributed
from modelzoo.train.loop import Forward, LoopSettings, LoopTask, TrainLoop, build_optimization
from modelzoo.train.parallel import data_parallel


@dataclass(frozen=True)
class RunPlace:
    """Where a run trains: its process group, its device and its (locked, checked) run directory."""

    dist: Distributed
    device: torch.device
    run_dir: Path

    def write_summary(self, summary: object) -> None:
        """`<run_dir>/summary.json` of a finished run (a dataclass), from rank 0."""
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")

    def release(self) -> None:
        """Let go of the run directory's lock (rank 0 holds it)."""
        if self.dist.is_main:
            runlock.release(self.run_dir)


def open_run(device: str, run_dir: Path, resume: bool, backend: Backend, keep: int) -> RunPlace:
    """The process group and device of `task.device` (`cuda:<local rank>` under torchrun), the run lock of `run_dir`
    (rank 0, until `RunPlace.release`), the backend's own checkpoints brought up to date for a resume, and the check
    that `run_dir` is new (or, for `resume`, has a checkpoint)."""
    device_type = resolved_device(device)
    dist = init_distributed(device_type)
    place = torch.device(f"cuda:{dist.local_rank}" if device_type == "cuda" else device_type)
    if place.type == "cuda":
        torch.cuda.set_device(place)
    if dist.is_main:  # one writer per run directory, until the run ends or the process dies
        runlock.acquire(run_dir)
    try:
        if resume:
            backend.sync_checkpoints(run_dir, keep)
        ckpt.check_run_dir(run_dir, resume=resume)
    except BaseException:
        if dist.is_main:
            runlock.release(run_dir)
        raise
    return RunPlace(dist, place, run_dir)


def assemble_loop(
    place: RunPlace,
    task: LoopTask,
    model: nn.Module,
    forward: Forward,
    backend: Backend,
    sparsifier: Sparsifier | None,
    optim: OptimConfig,
    settings: LoopSettings,
    config: Config,
    tokenizer: PreTrainedTokenizerBase,
    mask_names: list[str],
    resume: tuple[tuple[str, ...], str] | None,
    fused: bool = False,
    identity: dict | None = None,
    parallelism: str = "ddp",
) -> TrainLoop:
    """The loop of a run: AdamW and its schedule (the backend's), masked by `sparsifier`; `config` recorded in every
    checkpoint. A new run saves `tokenizer` under `<run_dir>/tokenizer`; `resume` (the keys a checkpoint must share
    with `config`, and how to start afresh instead) continues the newest checkpoint exactly. Under torchrun the model
    is replicated or sharded as `parallelism` (`task.parallelism`) says, before its optimizer is built."""
    parallel = data_parallel(parallelism, place.dist, settings.precision, getattr(sparsifier, "mask_gradients", None))
    forward = parallel.wrap(model, forward)
    optimizer, scheduler = build_optimization(model, optim, settings.max_steps, backend, sparsifier, fused)
    loop = TrainLoop(
        task=task,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scheduler=scheduler,
        backend=backend,
        sparsifier=sparsifier,
        settings=settings,
        dist=place.dist,
        device=place.device,
        run_dir=place.run_dir,
        config_yaml=OmegaConf.to_yaml(OmegaConf.structured(config)),
        mask_names=mask_names,
        identity=identity,
        parallel=parallel,
    )
    if resume:
        loop.resume(*resume)
    elif place.dist.is_main:
        place.run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(place.run_dir / "tokenizer")
    return loop

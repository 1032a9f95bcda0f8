"""cerebras.pytorch (cstorch) backend: our training loop on cstorch's CPU, GPU or CSX (CS-2) backend.

What each piece of the trainer becomes (cerebras-pytorch 2.10.0, facts in DESIGN.md section 2):
- `start`: `cstorch.backend(target, artifact_dir=...)`; for CSX also `compile_only` / `validate_only` and a
  `cstorch.distributed.ClusterConfig` built from the `cluster` node (`cluster.py`). cstorch allows one backend
  per process, so a later run in the same process reuses it (same target only).
- `autocast` / `grad_scaler`: `task.precision` as cstorch's AMP (`precision.py`), set in `start`.
- `compile`: `cstorch.compile(model, backend)`, which also makes `model.apply(sparsity)` work.
- `sparsifier`: `CerebrasSparsity` (`sparsity.py`), cstorch's algorithms from the same `sparsity` node.
- `optimizer_class`: `cstorch.optim.AdamW` (GMP, SET and RigL need a cstorch optimizer); `scheduler`: the
  LR schedule as cstorch schedulers, computed in the traced program from its step (`schedule.py`).
- `run`: trains in stages of `DataExecutor`s with a checkpoint closure and evaluation between them
  (`stages.py`), or under `cluster.mode` compile_only / validate_only lowers one training and one evaluation
  step and reports what was lowered (`lowering.py`).
- `sync_checkpoints`: the run's `cstorch.save` checkpoints not yet converted become our checkpoint directories.
- `check_config`: what a CS-2 run needs of the config (`checks.py`).
Checkpoint conversion to and from `cstorch.save` files lives in `modelzoo.backends.cerebras.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelzoo.backends.base import Backend, Capabilities, LoopDriver, RunOutcome
from modelzoo.backends.cerebras.checks import check_cerebras_config
from modelzoo.backends.cerebras.cluster import cluster_config
from modelzoo.backends.cerebras.environment import CerebrasError, import_cstorch, put_venv_tools_on_path
from modelzoo.backends.cerebras.environment import unavailable_reason as _unavailable_reason
from modelzoo.backends.cerebras.lowering import lower
from modelzoo.backends.cerebras.precision import autocast, grad_scaler, set_precision
from modelzoo.backends.cerebras.schedule import build_scheduler
from modelzoo.backends.cerebras.sparsity import CSTORCH_ALGORITHMS, CerebrasSparsity, check_sparsity
from modelzoo.backends.cerebras.stages import StagedRun, convert_new_checkpoints
from modelzoo.cluster import ClusterConfig
from modelzoo.config import Config
from modelzoo.config.train import OptimConfig
from modelzoo.sparsity.config import SparsityConfig


class CerebrasBackend(Backend):
    name = "cerebras"
    capabilities = Capabilities(
        algorithms=frozenset(CSTORCH_ALGORITHMS),
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({"fp32", "bf16", "cbf16", "fp16"}),
        own_compiler=True,  # cstorch traces the step, brings its AdamW and plans memory on the wafer
        weights_on_host=False,  # on a CS-2 the weights stay on the wafer; they come back in checkpoints
        torchrun=False,  # scales out over cluster.num_csx systems instead
        fsdp=False,  # the weights live on the wafer (or in cstorch's traced program), not in torch's FSDP2
        host_skips_updates=False,  # the update is in the traced program
        clusters=True,
        distillation=False,  # the traced step holds one model; a teacher would need a program of its own
    )

    def __init__(self) -> None:
        self.cs_backend: Any = None
        self.cfg: Config | None = None
        self.run_dir: Path | None = None
        self.cluster: ClusterConfig | None = None
        self.precision = "fp32"
        self.mode: str | None = None  # compile_only | validate_only | None (a training run)
        self.sparsity: CerebrasSparsity | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _unavailable_reason()

    @classmethod
    def check_config(cls, cfg: Config, device: str) -> None:
        check_cerebras_config(cfg, device)
        check_sparsity(cfg.sparsity)

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return import_cstorch().optim.AdamW

    def scheduler(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> Any:
        return build_scheduler(optimizer, cfg, max_steps)

    def start(self, cfg: Config, device: torch.device, run_dir: Path) -> None:
        cstorch = import_cstorch()
        cluster, precision, artifact_dir = cfg.cluster, cfg.task.precision, run_dir / self.name
        self.cfg, self.cluster, self.precision, self.run_dir = cfg, cluster, precision, run_dir
        self.mode = None if cluster.mode == "train" else cluster.mode
        target = cluster.resolved_target(device.type)
        existing = cstorch.current_backend(raise_exception=False, raise_warning=False)
        if existing is not None:
            if existing.backend_type.name != target:
                raise CerebrasError(
                    f"this process already runs cstorch's {existing.backend_type.name} backend and cstorch allows one "
                    f"per process: run the {target} job in a new process"
                )
            existing.artifact_dir = Path(artifact_dir)
            self.cs_backend = existing
            set_precision(precision)
            return
        options: dict[str, Any] = {"artifact_dir": str(artifact_dir)}
        if target == "CSX":
            put_venv_tools_on_path()
            options.update(
                compile_only=cluster.mode == "compile_only",
                validate_only=cluster.mode == "validate_only",
                cluster_config=cluster_config(cluster),
            )
        self.cs_backend = cstorch.backend(target, **options)
        set_precision(precision)

    def autocast(self, device: torch.device, precision: str) -> AbstractContextManager:
        return autocast(precision)

    def grad_scaler(self, precision: str) -> Any:
        return grad_scaler(precision)

    def compile(self, model: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        return import_cstorch().compile(model, self.cs_backend)

    def sparsifier(self, config: SparsityConfig, seed: int) -> CerebrasSparsity:
        self.sparsity = CerebrasSparsity(config, seed)
        return self.sparsity

    def sync_checkpoints(self, run_dir: Path, keep: int) -> None:
        convert_new_checkpoints(run_dir / self.name, run_dir, keep)

    def run(self, loop: LoopDriver) -> RunOutcome:
        """Train in stages, or under `cluster.mode` compile_only / validate_only lower one training and one
        evaluation step, print the report and ask for the programs cstorch could not lower in this process (it
        aborts at a second remote compile) to be lowered each in a new process."""
        artifacts = Path(self.cs_backend.artifact_dir)
        staged = StagedRun(loop, artifacts, self.cfg, self.sparsity.levels if self.sparsity else {})
        if self.mode is None:
            staged.run()
            return RunOutcome(trained=True)
        programs = {n: step for n, step in staged.one_step_each().items() if n in self.cluster.programs}
        report = lower(self.mode, artifacts, programs, loop.sparse_names(), self.cluster)
        print(report.format())
        cfg = self.cfg
        return RunOutcome(
            trained=False,
            new_process_runs=tuple(
                replace(
                    cfg,
                    cluster=replace(cfg.cluster, programs=[program]),
                    run_dir=str(self.run_dir / self.name / f"lower-{program}"),
                )
                for program in report.skipped
            ),
        )

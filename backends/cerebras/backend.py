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
- `prepare_resume`: the run's `cstorch.save` checkpoints not yet converted become our checkpoint directories.
Checkpoint conversion to and from `cstorch.save` files lives in `modelzoo.export.cerebras_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelzoo.backends.base import Backend, Capabilities, LoopDriver
from modelzoo.backends.cerebras.cluster import cluster_config
from modelzoo.backends.cerebras.environment import CerebrasError, import_cstorch, put_venv_tools_on_path
from modelzoo.backends.cerebras.environment import unavailable_reason as _unavailable_reason
from modelzoo.backends.cerebras.lowering import lower
from modelzoo.backends.cerebras.precision import autocast, grad_scaler, set_precision
from modelzoo.backends.cerebras.schedule import build_scheduler
from modelzoo.backends.cerebras.sparsity import CSTORCH_ALGORITHMS, CerebrasSparsity, check_sparsity
from modelzoo.backends.cerebras.stages import StagedRun, convert_new_checkpoints
from modelzoo.cluster import ClusterConfig
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.train.config import OptimConfig


class CerebrasBackend(Backend):
    name = "cerebras"
    capabilities = Capabilities(
        algorithms=frozenset(CSTORCH_ALGORITHMS),
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({"fp32", "bf16", "cbf16", "fp16"}),
    )
    weights_on_host = False

    def __init__(self) -> None:
        self.cs_backend: Any = None
        self.cluster: ClusterConfig | None = None
        self.precision = "fp32"
        self.mode: str | None = None  # compile_only | validate_only | None (a training run)
        self._left: list[str] = []  # programs a compile_only run left for a new process

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _unavailable_reason()

    @classmethod
    def check_config(cls, sparsity: SparsityConfig) -> None:
        check_sparsity(sparsity)

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return import_cstorch().optim.AdamW

    def scheduler(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> Any:
        return build_scheduler(optimizer, cfg, max_steps)

    def start(self, cluster: ClusterConfig, device: torch.device, artifact_dir: Path, precision: str = "fp32") -> None:
        cstorch = import_cstorch()
        self.cluster = cluster
        self.precision = precision
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
        return CerebrasSparsity(config, seed)

    def prepare_resume(self, artifact_dir: Path, run_dir: Path, keep: int) -> None:
        convert_new_checkpoints(artifact_dir, run_dir, keep)

    def run(self, loop: LoopDriver) -> bool:
        """Train in stages, or under `cluster.mode` compile_only / validate_only lower one training and one
        evaluation step and print the report."""
        artifacts = Path(self.cs_backend.artifact_dir)
        staged = StagedRun(loop, artifacts)
        if self.mode is None:
            staged.run()
            return True
        programs = {n: step for n, step in staged.one_step_each().items() if n in self.cluster.programs}
        report = lower(self.mode, artifacts, programs, loop.sparse_names(), self.cluster)
        self._left = report.skipped
        print(report.format())
        return False

    def lowering_left(self) -> list[str]:
        return self._left

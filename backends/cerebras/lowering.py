"""compile_only / validate_only: what cstorch lowered for the CS-2 (read from `cirh.mlir`) and where it stopped."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelzoo.cluster import ClusterConfig

# One argument's attribute dict in the lowered program, e.g.
# {cs.max_sparsity = 7.5e-01 : f32, ..., cs.sparsity = 7.5e-01 : f32, ..., tf.resource_name = "state.model.<name>"}
_ATTRIBUTES = re.compile(r"\{[^{}]*tf\.resource_name = \"state\.model\.([^\"]+)\"[^{}]*\}")
_SPARSITY = re.compile(r"\bcs\.sparsity = ([-+0-9.e]+) : f32")


def _lowered(executors: Path) -> set[Path]:
    """The lowered programs under cstorch's `executors/` (each run's directory; not the `latest` link)."""
    return {p for p in executors.glob("*/cirh.mlir") if not p.parent.is_symlink()}


def mlir_sparsity(path: str | Path) -> dict[str, float]:
    """The `cs.sparsity` annotation of each model tensor in a lowered program (`cirh.mlir`), by parameter name."""
    found = {}
    for attributes in _ATTRIBUTES.finditer(Path(path).read_text()):
        level = _SPARSITY.search(attributes.group(0))
        if level:
            found[attributes.group(1)] = float(level.group(1))
    return found


@dataclass
class LoweringReport:
    """What a compile_only / validate_only run produced locally and where it stopped."""

    mode: str
    mlir: dict[str, Path]  # by program: training, evaluation
    skipped: list[str]  # programs not lowered
    annotations: dict[str, float]
    sparse_names: list[str]
    stopped: str | None
    missing: list[str]

    def format(self) -> str:
        covered = sum(n in self.annotations for n in self.sparse_names)
        levels = sorted({f"{v:g}" for v in self.annotations.values()})
        lines = [f"{self.mode}: lowered the {name} step for the CS-2 to {path}" for name, path in self.mlir.items()]
        lines += [
            f"{self.mode}: the {name} step is lowered next, in a new process (cstorch 2.10 aborts a process at its "
            "second remote compile)"
            for name in self.skipped
        ]
        if "training" in self.mlir:
            lines.append(
                f"sparsity annotations: {covered} of {len(self.sparse_names)} sparse weights "
                f"(cs.sparsity {', '.join(levels) or '-'})"
            )
        if self.stopped is None and self.mode == "validate_only":
            ahead = f"; a submission also needs {' and '.join(self.missing)}" if self.missing else ""
            lines.append(f"validate_only: the program passed cstorch's checks (nothing was sent to a cluster){ahead}")
        elif self.stopped is None:
            lines.append("compile_only: the cluster compiled the program")
        elif self.missing:
            lines.append(
                f"stopped at the remote compile ({self.stopped}); to go further set {' and '.join(self.missing)}"
            )
        else:
            lines.append(f"stopped at the remote compile: {self.stopped}; check the address, certificate and network")
        return "\n".join(lines)


def lower(
    mode: str,
    artifact_dir: Path,
    programs: dict[str, Callable[[], None]],
    sparse_names: list[str],
    cluster: ClusterConfig,
) -> LoweringReport:
    """Run one step of each program (training first) under compile_only / validate_only: cstorch lowers it here,
    then the appliance compiles it; under compile_only the programs after one whose remote compile failed are
    left (`skipped`) for a new process. Sparsity annotations are read from the training program.

    A failure once a program's lowered file exists is the remote step's (no address, no network); it is
    reported with what is missing. A failure before that is raised: the model does not lower.
    """
    executors = Path(artifact_dir) / "executors"
    stopped = None
    mlir = {}
    for name, run_step in programs.items():
        if stopped and mode == "compile_only":
            break  # cstorch 2.10 aborts the process at a second remote compile after a failed one
        before = _lowered(executors)
        try:
            run_step()
        except Exception as e:
            if not _lowered(executors) - before:
                raise
            stopped = stopped or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        mlir[name] = max(_lowered(executors) - before, key=lambda p: p.stat().st_mtime)
    annotations = mlir_sparsity(mlir["training"]) if "training" in mlir else {}
    skipped = [name for name in programs if name not in mlir]
    missing = cluster.missing_for_submission()
    return LoweringReport(mode, mlir, skipped, annotations, sparse_names, stopped, missing)

"""The `prune` task's config (Hydra `task=prune`): method, target, calibration, SparseGPT knobs, input and output.

`sparsity` is the fraction of zeros of every pruned weight; `n_m: [n, m]` instead keeps `n` of every `m`
consecutive input weights (2:4 keeps 2 of 4, sparsity 0.5). `validate` checks every key that can be judged
without the model; `modelzoo.tasks.prune` checks the rest (filter, N:M divisibility, calibration set) once the
model and corpus are loaded, still before any pruning compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelzoo.errors import ConfigError
from modelzoo.sparsity.config import NMPattern
from modelzoo.sparsity.names import as_globs

METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclass
class PruneConfig:
    """One-shot pruning of a dense model (the first step of the Sparse Llama recipe, arXiv 2405.03594).

    Attributes:
        method: `sparsegpt` (Frantar & Alistarh 2023, arXiv 2301.00774), `wanda` (Sun et al. 2023,
            arXiv 2306.11695) or `magnitude`.
        sparsity: fraction of zeros in [0, 1); with `n_m` it may be null or must equal 1 - n/m.
        n_m: `[n, m]` for N:M sparsity: `n` nonzeros kept in every run of `m` consecutive input weights.
        param_filter: glob or list of globs choosing the weights to prune (Cerebras aliases understood); null is
            Cerebras' default filter. Only linear weights inside the transformer blocks are pruned.
        calibration_samples: sequences of `data.seq_len` tokens drawn from the training split of `data`.
        block_size: SparseGPT's column block (lazy batch updates and adaptive mask selection).
        dampening: SparseGPT's Hessian dampening as a fraction of the mean diagonal; raised 10x per retry when
            the Cholesky factorisation fails.
        update_weights: SparseGPT's OBS update of the remaining weights; false gives the mask-only variant.
        checkpoint: our training checkpoint to prune (default: the latest in `run_dir` unless `hf_dir` is set).
        hf_dir: a local Hugging Face causal-LM directory (GPT-2 or Llama family) to prune instead.
        output_dir: where the pruned Hugging Face directory goes (default: beside the input, named after the
            method and target).
        device: where each block and its Hessians are computed (`auto`: CUDA when visible); the rest stays on CPU.
        batch_size: calibration sequences per forward pass of a block.
    """

    name: str = "prune"
    method: str = "sparsegpt"
    sparsity: float | None = 0.5
    n_m: list[int] | None = None
    param_filter: Any = None
    calibration_samples: int = 128
    block_size: int = 128
    dampening: float = 0.01
    update_weights: bool = True
    checkpoint: str | None = None
    hf_dir: str | None = None
    output_dir: str | None = None
    device: str = "auto"
    batch_size: int = 8

    @property
    def nm(self) -> NMPattern | None:
        """`n_m` as the sparsity spec's N:M pattern, or None for unstructured sparsity."""
        return None if self.n_m is None else NMPattern(*self.n_m)

    @property
    def pattern(self) -> tuple[int, int] | None:
        """N:M as `(n kept, m)`, as the mask functions take it, or None."""
        return None if self.nm is None else (self.nm.n, self.nm.m)

    @property
    def level(self) -> float:
        """The fraction of zeros: `sparsity`, or 1 - n/m for N:M."""
        return float(self.sparsity) if self.nm is None else self.nm.sparsity

    @property
    def filters(self) -> list[str] | None:
        return as_globs(self.param_filter)

    @property
    def tag(self) -> str:
        """Short name of the target, e.g. `sparsegpt-50` or `wanda-2of4`."""
        if self.pattern is not None:
            return f"{self.method}-{self.pattern[0]}of{self.pattern[1]}"
        return f"{self.method}-{round(self.level * 100)}"

    def summary(self) -> dict[str, Any]:
        """What `sparsity.json` records about how the weights were pruned."""
        info: dict[str, Any] = {
            "method": f"one-shot {self.method}",
            "target_sparsity": self.level,
            "pattern": "unstructured" if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}",
            "calibration_samples": self.calibration_samples,
        }
        if self.method == "sparsegpt":
            info.update(block_size=self.block_size, dampening=self.dampening, update_weights=self.update_weights)
        return info


def validate(task: PruneConfig, prefix: str = "task") -> None:
    """Reject invalid values before anything is loaded; errors name `task.<key>` and what would work."""
    if task.method not in METHODS:
        raise ConfigError(f"{prefix}.method", f"unknown {task.method!r}", METHODS)
    if task.n_m is not None:
        _validate_n_m(task, prefix)
    elif task.sparsity is None:
        raise ConfigError(f"{prefix}.sparsity", "missing: give a fraction of zeros in [0, 1) or task.n_m=[2,4]")
    elif isinstance(task.sparsity, bool) or not 0.0 <= task.sparsity < 1.0:
        raise ConfigError(f"{prefix}.sparsity", f"{task.sparsity} is outside [0, 1) (the fraction of zeros)")
    filters = task.filters
    if filters is not None and (not filters or not all(isinstance(f, str) and f for f in filters)):
        raise ConfigError(f"{prefix}.param_filter", f"must be a glob or a non-empty list of globs, got {filters!r}")
    for key in ("calibration_samples", "block_size", "batch_size"):
        if getattr(task, key) < 1:
            raise ConfigError(f"{prefix}.{key}", f"must be at least 1, got {getattr(task, key)}")
    if not task.dampening > 0:
        raise ConfigError(
            f"{prefix}.dampening",
            f"must be positive (a fraction of the mean Hessian diagonal, e.g. 0.01), got {task.dampening}",
        )
    if task.checkpoint and task.hf_dir:
        raise ConfigError(f"{prefix}.hf_dir", "give either task.checkpoint or task.hf_dir, not both")


def _validate_n_m(task: PruneConfig, prefix: str) -> None:
    if len(task.n_m) != 2:
        raise ConfigError(f"{prefix}.n_m", f"must be two integers [n, m], got {list(task.n_m)}")
    task.nm.check(f"{prefix}.n_m", f"{prefix}.sparsity", task.sparsity)

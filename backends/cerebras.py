"""cerebras.pytorch (cstorch) backend: our training loop on cstorch's CPU, GPU or CSX (CS-2) backend.

What each piece of the trainer becomes (cerebras-pytorch 2.10.0, facts in DESIGN.md section 2):
- `start`: `cstorch.backend(target, artifact_dir=...)`; for CSX also `compile_only` / `validate_only` and a
  `cstorch.distributed.ClusterConfig` built from the `cluster` node. cstorch allows one backend per process,
  so a later run in the same process reuses it (same target only).
- `compile`: `cstorch.compile(model, backend)`, which also makes `model.apply(sparsity)` work.
- `CerebrasSparsity`: `cstorch.sparse.configure(...)` built from the same `sparsity` node as masked_dense,
  applied with `model.apply` / `optimizer.apply`. Each group's `param_filter` is resolved by our name
  matching (which also understands Cerebras Model Zoo names) into the exact parameter names, and the
  initial masks are the ones masked_dense draws from the same seed (passed as cstorch's `init_method`
  callable), so both backends start from identical masks; cstorch's own algorithms then update them.
- `optimizer_class`: `cstorch.optim.AdamW` (GMP, SET and RigL need a cstorch optimizer).
- `batches`: `cstorch.utils.data.DataLoader` + `DataExecutor`; `wrap_step`: the step under `@cstorch.trace`,
  its loss and gradient norm handed to the trainer's bookkeeping through a `step_closure`.
- checkpoints: `save_cstorch` / `load_cstorch` (`cstorch.save`, HDF5) and conversion to and from our
  checkpoint directories (weights and `<param>_mask` buffers carry the same names on both sides).

`import cerebras.pytorch` happens only when this backend is used: it needs Python 3.11 and torch 2.4.0,
which live in their own venv (`bash scripts/make_cerebras_venv.sh .venv-cerebras`).
"""

import copy
import functools
import importlib.util
import os
import re
import shutil
import sys
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from modelzoo.backends.base import Backend, Capabilities, LoopDriver
from safetensors.torch import load_file
from torch import nn

from modelzoo.cluster import ClusterConfig
from modelzoo.errors import CheckpointError, ConfigError, ModelZooError
from modelzoo.restore import build_model, config_from_yaml
from modelzoo.sparsity.config import DROP_ALGORITHMS, SparsityConfig, SparsityGroupConfig
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.sparsity.plan import plan_groups
from modelzoo.sparsity.plugin import MaskedSparsity, SparsityStats, sparsity_stats
from modelzoo.train import checkpoint as ckpt

CSTORCH_VERSION = "2.10.0"
TORCH_VERSION = "2.4.0"
PYTHON_VERSION = (3, 11)
VENV_FIX = "make its venv with `bash scripts/make_cerebras_venv.sh .venv-cerebras` and run from it"
# Our algorithm names -> the cstorch.sparse classes that implement them.
CSTORCH_ALGORITHMS = {"static": "Static", "gmp": "GMP", "set": "SET", "rigl": "RigL"}


class CerebrasError(ModelZooError, RuntimeError):
    """cerebras.pytorch cannot do what was asked (missing, wrong version, or the appliance is unreachable)."""


def environment_problem(python: tuple[int, int], installed: bool, torch_version: str) -> str | None:
    """Why cerebras.pytorch cannot run with this Python, install state and torch: one sentence and the fix."""
    if python != PYTHON_VERSION:
        return (
            f"backend=cerebras needs Python 3.11 (cerebras-pytorch {CSTORCH_VERSION} ships cp311 wheels only) but "
            f"this is Python {python[0]}.{python[1]}: {VENV_FIX}"
        )
    if not installed:
        return f"backend=cerebras needs cerebras.pytorch, which is not installed: {VENV_FIX}"
    if torch_version.split("+")[0] != TORCH_VERSION:
        return (
            f"cerebras-pytorch {CSTORCH_VERSION} needs torch {TORCH_VERSION} exactly but torch {torch_version} "
            f"is installed: {VENV_FIX}"
        )
    return None


@functools.cache
def _unavailable_reason() -> str | None:
    installed = importlib.util.find_spec("cerebras") is not None and importlib.util.find_spec("cerebras.pytorch")
    problem = environment_problem(sys.version_info[:2], bool(installed), torch.__version__)
    if problem:
        return problem
    try:
        import cerebras.pytorch  # noqa: F401
    except Exception as e:  # an undefined symbol, a missing dependency: anything that stops the import
        first = str(e).splitlines()[0] if str(e) else ""
        return f"cerebras.pytorch fails to import ({type(e).__name__}: {first}): {VENV_FIX}"
    return None


def check_algorithms(sparsity: SparsityConfig, version: str, available: set[str]) -> None:
    """Refuse a group whose algorithm has no class among `available` in cerebras-pytorch `version`."""
    for key, group in sparsity.group_configs():
        name = CSTORCH_ALGORITHMS[group.algorithm]
        if group.enabled and name not in available:
            raise ConfigError(
                f"{key}.algorithm",
                f"cerebras-pytorch {version} has no {name}: install {CSTORCH_VERSION} "
                "(bash scripts/make_cerebras_venv.sh VENV) or choose one it has",
                [a for a, c in CSTORCH_ALGORITHMS.items() if c in available],
            )


def import_cstorch() -> ModuleType:
    """`cerebras.pytorch`, or a `CerebrasError` saying in one sentence why not and how to fix it."""
    reason = _unavailable_reason()
    if reason:
        raise CerebrasError(reason)
    import cerebras.pytorch as cstorch

    return cstorch


def cluster_config(cluster: ClusterConfig, python_path: Path) -> Any:
    """Our `cluster` node as `cstorch.distributed.ClusterConfig`; `python_path` (this checkout) is added."""
    cstorch = import_cstorch()
    return cstorch.distributed.ClusterConfig(
        mgmt_address=cluster.mgmt_address,
        mgmt_namespace=cluster.mgmt_namespace,
        credentials_path=cluster.credentials_path,
        num_csx=cluster.num_csx,
        max_wgt_servers=cluster.max_wgt_servers,
        max_act_per_csx=cluster.max_act_per_csx,
        num_workers_per_csx=cluster.num_workers_per_csx,
        job_labels=list(cluster.job_labels),
        job_priority=cluster.job_priority,
        job_time_sec=cluster.job_time_sec,
        mount_dirs=list(cluster.mount_dirs),
        python_paths=[*cluster.python_paths, str(python_path)],
        disable_version_check=cluster.disable_version_check,
    )


def _put_venv_tools_on_path() -> None:
    """cstorch lowers with the `torch-cirh-opt` tool its wheel puts in the venv's bin/, which it looks up on
    PATH; a venv used without activating it (`.venv-cerebras/bin/python ...`) lacks it there."""
    if shutil.which("torch-cirh-opt") is None:
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _plain(value: Any) -> Any:
    """A schedule or update spec as cstorch reads it: numbers, lists and dicts (copied, never shared)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _init_method(masks: dict[int, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A cstorch `init_method` that returns the precomputed mask of each parameter (looked up by identity)."""

    def init_method(p, sparsity, score_shaper=None, device=None):
        return masks[id(p)].to(device or p.device)

    # cstorch checks the callable's annotations against its `InitMethodCallable` hint, so use exactly those.
    cstorch = import_cstorch()
    arg_types, return_type = typing.get_args(cstorch.sparse.init.InitMethodCallable)
    names = ("p", "sparsity", "score_shaper", "device")
    init_method.__annotations__ = {**dict(zip(names, arg_types, strict=True)), "return": return_type}
    return init_method


def group_spec(group: SparsityGroupConfig, names: Iterable[str], init_method: Any) -> dict[str, Any]:
    """One `cstorch.sparse.configure` dict for a group of ours, selecting exactly `names`."""
    spec: dict[str, Any] = {
        "algorithm": group.algorithm,
        "sparsity": _plain(group.sparsity_spec),
        "init_method": init_method,
        "param_filter": list(names),
    }
    if group.dynamic and group.update is not None:
        spec["update"] = _plain(group.update)
    if group.algorithm in DROP_ALGORITHMS:
        spec["drop_fraction"] = _plain(group.drop_fraction_spec)
    return spec


class CerebrasSparsity:
    """The sparsity plug-in on cstorch: a `cstorch.sparse.Group` built from our `sparsity` node."""

    def __init__(self, config: SparsityConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.group: Any = None
        self.names: list[str] = []
        self._params: list[tuple[str, nn.Parameter]] = []

    def apply(self, model: nn.Module) -> None:
        """Configure cstorch's algorithms for the parameters each group selects and attach them.

        `model` must have been through `cstorch.compile` (the backend's `compile`), which makes
        `model.apply(sparsity)` cstorch's.
        """
        cstorch = import_cstorch()
        plans = plan_groups(self.config, model)
        by_name = MaskedSparsity(self.config, self.seed).initial_masks(model)
        params = dict(model.named_parameters())
        init = _init_method({id(params[n]): mask for n, mask in by_name.items()})
        self.group = cstorch.sparse.configure([group_spec(p.config, p.names, init) for p in plans])
        model.apply(self.group)
        self.names = [n for n in params if n in by_name]
        self._params = [(n, params[n]) for n in self.names]

    def apply_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer.apply(sparsity)`, then on CPU / GPU the masks are initialised at once (cstorch leaves them
        all-True until a `DataExecutor` starts), so that they can be inspected, saved or loaded before training.
        On CSX the masks are initialised as part of the traced program."""
        optimizer.apply(self.group)
        if not import_cstorch().use_cs():
            self.group.initialize()

    def mask_names(self) -> list[str]:
        return [n + MASK_SUFFIX for n in self.names]

    def stats(self) -> SparsityStats:
        return sparsity_stats(self._params)

    def state_dict(self) -> dict:
        return self.group.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.group.load_state_dict(state)


# ---- compile_only / validate_only ----------------------------------------------------------------------

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
    mlir: Path
    annotations: dict[str, float]
    sparse_names: list[str]
    stopped: str | None
    missing: list[str]

    def format(self) -> str:
        covered = sum(n in self.annotations for n in self.sparse_names)
        levels = sorted({f"{v:g}" for v in self.annotations.values()})
        lines = [
            f"{self.mode}: lowered one training step for the CS-2 to {self.mlir}",
            f"sparsity annotations: {covered} of {len(self.sparse_names)} sparse weights "
            f"(cs.sparsity {', '.join(levels) or '-'})",
        ]
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


class _Batches:
    """Our batch iterator as cstorch's `DataLoader` argument, handed over as itself.

    cstorch deep-copies its input function's arguments: the copy would advance while the trainer's loader,
    whose position every checkpoint saves, stayed at its start (a resumed run would see its data again),
    and the corpus would be held twice.
    """

    def __init__(self, batches: Iterable[tuple[torch.Tensor, ...]]) -> None:
        self.batches = batches

    def __deepcopy__(self, memo: dict) -> "_Batches":
        return self

    def __getstate__(self) -> dict:
        """Pickled for a cluster's input workers: they get a copy (a memory-mapped corpus becomes an array)."""
        return {"batches": copy.deepcopy(self.batches)}


def _input_fn(batches: _Batches) -> Iterable[tuple[torch.Tensor, ...]]:
    """cstorch's `DataLoader` input function (module level, so that it pickles for a cluster's input workers)."""
    return batches.batches


class CerebrasBackend(Backend):
    name = "cerebras"
    capabilities = Capabilities(
        algorithms=frozenset(CSTORCH_ALGORITHMS),
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({"fp32"}),
    )

    def __init__(self) -> None:
        self.cs_backend: Any = None
        self.cluster: ClusterConfig | None = None
        self.mode: str | None = None  # compile_only | validate_only | None (a training run)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _unavailable_reason()

    @classmethod
    def check_config(cls, sparsity: SparsityConfig) -> None:
        """Refuse what cstorch cannot run: N:M patterns, ERK, an algorithm the installed version lacks."""
        if not sparsity.enabled:
            return
        for key, group in sparsity.group_configs():
            if group.pattern is not None:
                raise ConfigError(
                    f"{key}.pattern",
                    "cstorch has no N:M algorithm: drop the pattern, or train N:M with backend=masked_dense",
                )
            if group.distribution != "uniform":
                raise ConfigError(
                    f"{key}.distribution",
                    f"{group.distribution!r} is not a cstorch distribution: set {key}.distribution=uniform, "
                    "or train it with backend=masked_dense",
                )
        cstorch = import_cstorch()
        available = {name for name in CSTORCH_ALGORITHMS.values() if hasattr(cstorch.sparse, name)}
        check_algorithms(sparsity, cstorch.__version__, available)

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return import_cstorch().optim.AdamW

    def start(self, cluster: ClusterConfig, device: torch.device, artifact_dir: Path) -> None:
        cstorch = import_cstorch()
        self.cluster = cluster
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
            return
        options: dict[str, Any] = {"artifact_dir": str(artifact_dir)}
        if target == "CSX":
            _put_venv_tools_on_path()
            options.update(
                compile_only=cluster.mode == "compile_only",
                validate_only=cluster.mode == "validate_only",
                cluster_config=cluster_config(cluster, Path(__file__).resolve().parents[1]),
            )
        self.cs_backend = cstorch.backend(target, **options)

    def compile(self, model: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        return import_cstorch().compile(model, self.cs_backend)

    def sparsifier(self, config: SparsityConfig, seed: int) -> CerebrasSparsity:
        return CerebrasSparsity(config, seed)

    def batches(
        self, batches: Iterable[tuple[torch.Tensor, ...]], steps: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        data = import_cstorch().utils.data
        return iter(data.DataExecutor(data.DataLoader(_input_fn, _Batches(batches)), num_steps=steps))

    def run(self, loop: LoopDriver) -> bool:
        """Train, or under `cluster.mode` compile_only / validate_only lower one step and print the report."""
        if self.mode is None:
            return super().run(loop)
        print(self.lower(loop.run_one_step, loop.sparse_names(), self.cluster).format())
        return False

    def lower(self, run_step: Callable[[], None], sparse_names: list[str], cluster: ClusterConfig) -> LoweringReport:
        """Run one step under compile_only / validate_only: cstorch lowers it here, then the appliance compiles.

        A failure once the lowered program exists is the remote step's (no address, no network); it is
        reported with what is missing. A failure before that is raised: the model does not lower.
        """
        executors = Path(self.cs_backend.artifact_dir) / "executors"
        before = _lowered(executors)
        stopped = None
        try:
            run_step()
        except Exception as e:
            if not _lowered(executors) - before:
                raise
            stopped = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        mlir = max(_lowered(executors) - before, key=lambda p: p.stat().st_mtime)
        missing = cluster.missing_for_submission()
        return LoweringReport(self.mode or "", mlir, mlir_sparsity(mlir), sparse_names, stopped, missing)

    def wrap_step(
        self,
        step: Callable[..., tuple[torch.Tensor, ...]],
        end_step: Callable[..., None],
    ) -> Callable[..., None]:
        cstorch = import_cstorch()
        closure = cstorch.step_closure(end_step)

        @cstorch.trace
        def traced(*batch: torch.Tensor) -> None:
            closure(*step(*batch))

        return traced


# ---- checkpoints ----------------------------------------------------------------------------------------


def save_cstorch(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (`model`, `optimizer`, `global_step`, `config`, ...) with `cstorch.save` (HDF5)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import_cstorch().save(state, str(path))
    return path


def load_cstorch(path: str | Path) -> dict[str, Any]:
    """A `cstorch.save` file as plain tensors (cstorch hands out deferred tensors; they are read here)."""
    state = import_cstorch().load(str(path), map_location="cpu")

    def materialise(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: materialise(v) for k, v in value.items()}
        if isinstance(value, list):
            return [materialise(v) for v in value]
        return torch.as_tensor(value).clone() if torch.is_tensor(value) else value

    return materialise(state)


def checkpoint_to_cstorch(checkpoint: str | Path, path: str | Path) -> Path:
    """One of our checkpoint directories as a cstorch checkpoint file (masks kept as `<param>_mask`).

    It holds `model` (weights and masks), `optimizer`, `global_step` and our run config under
    `modelzoo_config`, from which `cstorch_to_checkpoint` rebuilds the model.
    """
    checkpoint = Path(checkpoint)
    ckpt.verify_checkpoint(checkpoint)
    optimizer_state, trainer_state = ckpt.load_training_state(checkpoint)
    state = {
        "model": load_file(str(checkpoint / ckpt.MODEL_FILE)),
        "optimizer": optimizer_state,
        "global_step": trainer_state["step"],
        "modelzoo_config": ckpt.read_config(checkpoint),
    }
    return save_cstorch(path, state)


def cstorch_to_checkpoint(path: str | Path, run_dir: str | Path) -> Path:
    """A cstorch checkpoint file written by `checkpoint_to_cstorch` as our checkpoint in `run_dir`.

    Weights, masks and config carry over, as a weights-only checkpoint (the file has no trainer state, so a
    run cannot resume from it, and says so): `modelzoo export`, `generate` and `prune` take it. `run_dir`
    must not hold a checkpoint yet.
    """
    ckpt.check_run_dir(run_dir, resume=False)
    state = load_cstorch(path)
    if "modelzoo_config" not in state:
        raise CheckpointError(f"{path} has no modelzoo_config: it was not written by checkpoint_to_cstorch")
    config_yaml = state["modelzoo_config"]
    model, _ = build_model(config_from_yaml(config_yaml))
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    tied = {"lm_head.weight", "transformer.wte.weight"}  # one tensor, stored under one of its names
    if unexpected or len(missing) > 1 or not set(missing) <= tied:
        raise CheckpointError(
            f"{path} does not match its config's model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return ckpt.save_weights(run_dir, int(state["global_step"]), model, config_yaml)

"""Atomic, verifiable training checkpoints.

Layout of one checkpoint, `<run_dir>/checkpoints/step_000100/`:
    model.safetensors   weights and `<param>_mask` buffers (tied weights stored once)
    optimizer.pt        optimizer state
    trainer.pt          step, scheduler, data position, sparsity state, RNG states
    config.yaml         the resolved run config
    identity.json       what a resume must keep: data, tokenizer, model, sparsity, ... (`modelzoo.train.identity`)
    manifest.json       format version, step, sha256 and size of every file above (written last)
`checkpoints/latest` names the newest complete checkpoint.

A sharded checkpoint (`task.parallelism=fsdp`, `save_checkpoint(shards=...)`) holds `dcp/` in place of
`model.safetensors` and `optimizer.pt`: a `torch.distributed.checkpoint` directory of model state (weights and whole
masks) and optimizer state, keyed by parameter name, one `.distcp` file written by each rank and a `.metadata`
index. Any number of ranks can load it (DCP reshards on load), one process included (`read_sharded_model`).

A checkpoint is written into a temporary directory, every file fsynced, then renamed into place, and only
then is `latest` switched (write + rename) and older checkpoints pruned: a crash at any moment leaves the
previous good checkpoint untouched and never a half-written one that looks complete (`modelzoo.atomic`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from modelzoo.atomic import atomic_directory, write_text_atomically
from modelzoo.distributed import Distributed
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.sparsity.masks import MASK_SUFFIX

FORMAT_VERSION = 1
MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE, CONFIG_FILE, IDENTITY_FILE, MANIFEST_FILE = (
    "model.safetensors",
    "optimizer.pt",
    "trainer.pt",
    "config.yaml",
    "identity.json",
    "manifest.json",
)
# What export, generate, evaluate and prune read: they verify these alone, so a damaged optimizer state (only a
# resume reads it) does not block exporting intact weights.
WEIGHT_FILES = (MODEL_FILE, CONFIG_FILE)
DCP_DIR = "dcp"  # a sharded checkpoint's model and optimizer state (torch.distributed.checkpoint)
LATEST = "latest"
# Room for what the tensors do not count: headers, pickled structure, config, identity, manifest.
SLACK_BYTES = 1 << 20
BEST = "best"  # written by runs that select a checkpoint (fine-tuning: the best on dev)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int,
    protect: tuple[str, ...] = (),
    identity: dict[str, Any] | None = None,
    shards: Distributed | None = None,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it and keep the newest `keep` checkpoints (and the
    checkpoints named in `protect`, e.g. the one model selection chose). `identity` (JSON values) is what a
    resume of the run must keep (`modelzoo.train.identity`).

    `shards`: the ranks of a model sharded with FSDP2 (a sharded checkpoint, module docstring). Every rank calls
    this with its part of the state (`optimizer_state` keyed by parameter name) and writes it into `dcp/` of rank
    0's temporary directory; rank 0 writes the rest and renames the directory into place, and every rank returns
    once it is there.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    main = shards is None or shards.is_main
    model_state = model.state_dict() if shards is None else get_model_state_dict(model)
    ranks = 1 if shards is None else shards.world_size  # each rank's share of the state, times the ranks
    needed = (state_bytes(model_state) + state_bytes(optimizer_state)) * ranks + state_bytes(trainer_state)
    with atomic_directory(final, needed + SLACK_BYTES) if main else _no_directory() as tmp:
        if shards is None:
            save_model(model, str(tmp / MODEL_FILE))
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        else:
            tmp = Path(shards.broadcast(str(tmp)))
            with one_process_dcp():
                dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / DCP_DIR))
        if main:
            torch.save(trainer_state, tmp / TRAINER_FILE)
            (tmp / CONFIG_FILE).write_text(config_yaml)
            if identity is not None:
                (tmp / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True))
            _write_manifest(tmp, step)
    if main:
        write_text_atomically(root / LATEST, final.name + "\n")
        _prune(root, keep, protect={final.name, *protect})
    if shards is not None:
        shards.barrier()
    return final


@contextmanager
def _no_directory() -> Iterator[None]:
    """What ranks other than 0 hold in place of rank 0's `atomic_directory` (whose path they are sent)."""
    yield None


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint is sharded (`dcp/`) rather than whole (`model.safetensors`)."""
    return (Path(path) / DCP_DIR).is_dir()


def weights_path(path: str | Path) -> Path:
    """Where a checkpoint's model tensors are: `dcp/` of a sharded checkpoint, else `model.safetensors`."""
    return Path(path) / (DCP_DIR if is_sharded(path) else MODEL_FILE)


def weight_files(path: str | Path) -> tuple[str, ...]:
    """What a checkpoint's weights are read from (export, generate, evaluate and prune verify these alone)."""
    return (DCP_DIR, CONFIG_FILE) if is_sharded(path) else WEIGHT_FILES


@contextmanager
def one_process_dcp() -> Iterator[None]:
    """Silence DCP's notice that it saves or loads in one process (torch 2.4 has no `no_dist=`): a sharded run
    without torchrun, and reading a sharded checkpoint whole, are meant to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def read_sharded_model(path: str | Path, keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    """The whole model tensors of a sharded checkpoint whose names `keep` accepts, read in this one process (any
    number of ranks wrote them)."""
    reader = dcp.FileSystemReader(str(Path(path) / DCP_DIR))
    tensors = {
        name.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in reader.read_metadata().state_dict_metadata.items()
        if name.startswith("model.") and isinstance(meta, TensorStorageMetadata) and keep(name.removeprefix("model."))
    }
    state = {"model": tensors}
    with one_process_dcp():
        dcp.load(state, storage_reader=reader)
    return state["model"]


def save_weights(run_dir: str | Path, step: int, model: nn.Module, config_yaml: str) -> Path:
    """Write a checkpoint of weights, masks and config only (e.g. imported from elsewhere) and point `latest` at it.

    It has no optimizer or trainer state, so `export`, `generate` and `prune` read it but `task.resume` does not.
    """
    final = checkpoint_dir(run_dir) / f"step_{step:06d}"
    with atomic_directory(final, state_bytes(model.state_dict()) + SLACK_BYTES) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        (tmp / CONFIG_FILE).write_text(config_yaml)
        _write_manifest(tmp, step)
    write_text_atomically(checkpoint_dir(run_dir) / LATEST, final.name + "\n")
    return final


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) state, each storage counted once (tied weights are stored once)."""
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = (value.to_local() if hasattr(value, "to_local") else value).untyped_storage()  # a DTensor's shard
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(state)
    return sum(seen.values())


def _write_manifest(directory: Path, step: int) -> None:
    """The manifest (sha256 and size of every file in `directory` and below, by relative path), written last."""
    files = {
        p.relative_to(directory).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def _prune(root: Path, keep: int, protect: set[str]) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name not in protect:
            shutil.rmtree(old)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None if it has none."""
    root = checkpoint_dir(run_dir)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist; delete {pointer} to start over")
    return path


def mark_best(run_dir: str | Path, checkpoint: Path) -> None:
    """Record `checkpoint` as the run's selected one (`selected_checkpoint` returns it from then on)."""
    write_text_atomically(checkpoint_dir(run_dir) / BEST, checkpoint.name + "\n")


def selected_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a run stands for: the one model selection marked best, else the newest; None if none."""
    pointer = checkpoint_dir(run_dir) / BEST
    if pointer.is_file() and (checkpoint_dir(run_dir) / pointer.read_text().strip()).is_dir():
        return checkpoint_dir(run_dir) / pointer.read_text().strip()
    return latest_checkpoint(run_dir)


def find_checkpoint(path: str | Path, key: str) -> Path:
    """`path` when it is a checkpoint directory, else the checkpoint the run directory `path` stands for
    (`selected_checkpoint`): the one place a command turns a user's path into a checkpoint.

    Raises:
        ConfigError: neither (naming `key`, the config key that gave `path`).
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    found = selected_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise ConfigError(key, f"{path} is neither a run directory with checkpoints nor a checkpoint directory")
    return found


def resolve_checkpoint(checkpoint: str | None, run_dir: str | Path) -> Path:
    """`find_checkpoint` of `task.checkpoint` when given, else of `run_dir`."""
    return find_checkpoint(checkpoint, "task.checkpoint") if checkpoint else find_checkpoint(run_dir, "run_dir")


class RunExists(CheckpointError):
    """A new run was asked for in a run directory that already holds a checkpoint (a multirun skips its job)."""


def check_run_dir(run_dir: str | Path, resume: bool) -> None:
    """Refuse to start over an existing run (`RunExists`), or to resume one that has no checkpoint (nothing is
    touched)."""
    existing = latest_checkpoint(run_dir)
    if resume and existing is None:
        raise CheckpointError(
            f"task.resume=true but {checkpoint_dir(run_dir)} holds no checkpoint; "
            "start without task.resume to begin a new run"
        )
    if not resume and existing is not None:
        raise RunExists(
            f"{run_dir} already holds checkpoint {existing.name}; pass task.resume=true to continue it "
            "or run_dir=<new dir> to start a new run (nothing was overwritten)"
        )


def verify_checkpoint(path: str | Path, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check that every file (or those named in `only`, files or directories) is present with its recorded size and
    sha256; return the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{manifest_path} is corrupted ({e})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    missing = [n for n in only or () if not any(_within(f, n) for f in files)]
    if missing:
        raise CheckpointError(f"{path}: {MANIFEST_FILE} lists no {missing[0]}")
    for name, meta in files.items():
        if only is not None and not any(_within(name, n) for n in only):
            continue
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{f} is truncated or changed: {f.stat().st_size} bytes, manifest says {meta['bytes']}"
            )
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f} is corrupted: its sha256 does not match the manifest")
    return manifest


def _within(file: str, entry: str) -> bool:
    """Whether the manifest's `file` is the checkpoint entry `entry` or lies in that directory."""
    return file == entry or file.startswith(entry + "/")


def read_config(path: str | Path) -> str:
    return (Path(path) / CONFIG_FILE).read_text()


def read_identity(path: str | Path) -> dict[str, Any] | None:
    """The run identity a checkpoint recorded, or None (weights-only checkpoints, older versions)."""
    file = Path(path) / IDENTITY_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def load_model_weights(path: str | Path, model: nn.Module, mask_names: list[str], drop_masks: bool = False) -> None:
    """Load weights and masks into `model`, refusing a checkpoint that lacks a mask the config needs or holds one
    it does not create; `drop_masks` loads the weights alone (the pruned entries are the exact zeros stored)."""
    file, unexpected_masks = check_stored_model(path, model, mask_names, drop_masks)
    if is_sharded(path):
        stored = read_sharded_model(path, lambda name: not (drop_masks and name in unexpected_masks))
        missing, unexpected = model.load_state_dict(stored, strict=False)
    else:
        missing, unexpected = load_model(model, str(file), strict=False)
    unexpected = [k for k in unexpected if not (drop_masks and k in unexpected_masks)]
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def check_stored_model(
    path: str | Path, model: nn.Module, mask_names: list[str], drop_masks: bool = False
) -> tuple[Path, list[str]]:
    """Refuse a checkpoint whose tensors have other shapes than `model`'s, that lacks a mask of `mask_names` or
    (unless `drop_masks`) holds another; returns the file (or `dcp/`) they are in and the masks it holds beyond."""
    file = weights_path(path)
    shapes = _stored_shapes(Path(path))
    keys = set(shapes)
    for name, tensor in model.state_dict().items():
        if name in shapes and shapes[name] != list(tensor.shape):
            raise CheckpointError(
                f"{file}: tensor {name} has shape {shapes[name]} but the model needs {list(tensor.shape)}: the "
                "checkpoint was written for another model config, or altered; use the model config it was trained "
                "with (its config.yaml)"
            )
    missing_masks = [m for m in mask_names if m not in keys]
    if missing_masks:
        raise CheckpointError(
            f"{file} has no masks for {len(missing_masks)} sparse parameters (e.g. {missing_masks[0]}) but the config "
            "is sparse: resuming would silently change which weights are pruned. Resume with the sparsity config "
            "the checkpoint was trained with."
        )
    unexpected_masks = sorted(k for k in keys if k.endswith(MASK_SUFFIX) and k not in mask_names)
    if unexpected_masks and not drop_masks:
        raise CheckpointError(
            f"{file} holds masks (e.g. {unexpected_masks[0]}) that this config does not create: it was trained "
            "with a different sparsity config"
        )
    return file, unexpected_masks


def _stored_shapes(path: Path) -> dict[str, list[int]]:
    """The shape of every model tensor a checkpoint stores, by state-dict name."""
    if is_sharded(path):
        meta = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
        return {k.removeprefix("model."): list(m.size) for k, m in meta.items() if k.startswith("model.")}
    with safe_open(str(path / MODEL_FILE), framework="pt") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (no dict)


def checkpoint_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """The `<param>_mask` tensors stored in a checkpoint, by buffer name."""
    if is_sharded(path):
        return read_sharded_model(path, lambda name: name.endswith(MASK_SUFFIX))
    with safe_open(str(Path(path) / MODEL_FILE), framework="pt") as f:
        names = [key for key in f.keys() if key.endswith(MASK_SUFFIX)]  # noqa: SIM118 (safe_open is no dict)
        return {key: f.get_tensor(key) for key in names}


def load_training_state(path: str | Path) -> tuple[dict, dict]:
    """(optimizer state, trainer state) of a verified checkpoint."""
    path = Path(path)
    if is_sharded(path):
        raise CheckpointError(
            f"{path} is sharded (task.parallelism=fsdp): its optimizer state is in {DCP_DIR}/, which "
            "torch.distributed.checkpoint reads (task.resume=true does); modelzoo export writes its weights"
        )
    if not (path / OPTIMIZER_FILE).is_file():
        raise CheckpointError(
            f"{path} holds weights only (no optimizer or trainer state), so it cannot be resumed; export it "
            "(modelzoo export) and start a new run from it with task.init_from=<the export>"
        )
    return _load_plain(path / OPTIMIZER_FILE), load_trainer_state(path)


def load_trainer_state(path: str | Path) -> dict:
    """The trainer state of a verified checkpoint (a sharded one keeps its optimizer state in `dcp/`)."""
    return _load_plain(Path(path) / TRAINER_FILE)


def _load_plain(file: Path) -> Any:
    """`torch.load` of tensors and plain containers only: a pickled object that would run code is refused unread.

    The manifest proves a checkpoint intact, not where it came from, so nothing in it may execute.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), type(e).__name__)
        raise CheckpointError(
            f"{file} holds pickled Python objects besides tensors and plain values; loading them could run code, "
            f"so it was refused ({reason}). modelzoo writes only tensors and plain values there: this file was "
            "written by something else (or by a version before weights-only checkpoints); export the weights "
            "(modelzoo export) and start a new run from them with task.init_from=<the export>"
        ) from e

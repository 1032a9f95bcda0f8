"""Cerebras Model Zoo GPT-2/GPT-3 and Llama checkpoints <-> our models and checkpoint format, masks included.

Names follow the Cerebras Model Zoo's own HF <-> CS GPT-2 and Llama converters (`modelzoo.sparsity.names`): GPT's
q, k and v are separate `proj_{q,k,v}_dense_layer`s there and one fused `c_attn` here (concatenated along the
output dimension); both sides store linear weights as `nn.Linear` (out, in), so nothing is transposed. Their
Llama rotates adjacent entries of a head (`rotate_every_two`), ours (HF's `rotate_half`) entries i and
i + head_dim / 2, so the rows of each head of q_proj and k_proj are interleaved on the way there and
de-interleaved on the way back, as their converter does; everything else is a rename. Differences between
releases, all read: 1.7-1.9 prefix every key with `model.`; 1.7 keeps a copy of the final norm as `ln_f`; 2.1+
moved the position embeddings to `embedding_layer.position_embeddings.embed.weight`; `lm_head.weight` is the
token embedding where the model ties them (GPT always, Llama with `share_embedding_weights`). Sparsity comes as
cstorch's `<name>_mask` bool buffers or, from 1.x sideband training, as NaN at every pruned weight (what
Cerebras' `finalize_cs2_sparsity` turns into zeros). Written back in the 2.1+ layout with `*_mask` buffers and
the pruned weights at exact zero.

Files: a `torch.save` dict (the state dict, or `{"model": state_dict, ...}` as Model Zoo checkpoints hold it),
safetensors, or a `cstorch.save` HDF5 file, which only `cstorch.load` reads (so only in the Cerebras venv).
`load_cstorch` / `save_cstorch` read and write those files; `checkpoint_to_cstorch` / `cstorch_to_checkpoint`
convert our checkpoint directories to and from them.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from modelzoo.atomic import atomic_directory
from modelzoo.backends.cerebras.environment import CerebrasError, import_cstorch
from modelzoo.backends.cerebras.params import CerebrasRecipe, read_params, to_params, write_params
from modelzoo.checkpoint import (
    MODEL_FILE,
    check_run_dir,
    load_training_state,
    read_config,
    save_checkpoint,
    save_weights,
    verify_checkpoint,
)
from modelzoo.config import Config
from modelzoo.config.train import TrainConfig
from modelzoo.data.config import DataConfig
from modelzoo.errors import CheckpointError
from modelzoo.models.registry import CausalLM, ModelConfig, model_class, unpad_vocab
from modelzoo.restore import build_model, config_from_yaml, restore_model
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.sparsity.names import cerebras_names

HEAD = "lm_head.weight"
# Other spellings of a Cerebras name in some releases (2.1+ position embeddings, 1.7's copy of the final norm).
ALIASES = {
    "embedding_layer.position_embeddings.weight": ("embedding_layer.position_embeddings.embed.weight",),
    "transformer_decoder.norm.weight": ("ln_f.weight",),
    "transformer_decoder.norm.bias": ("ln_f.bias",),
}
WRITTEN = {"embedding_layer.position_embeddings.weight": "embedding_layer.position_embeddings.embed.weight"}
# Our Llama's rotated projections, whose rows the Model Zoo orders differently within each head.
ROTATED = re.compile(r"model\.layers\.\d+\.self_attn\.([qk])_proj\.weight")


def tied_embedding(model: CausalLM) -> str | None:
    """Our name of the token embedding where `model`'s head is that same tensor (GPT; Llama when tied), else None."""
    if model.get_parameter(HEAD) is not model.embedding.weight:
        return None
    return next(n for n, p in model.named_parameters() if p is model.embedding.weight)


def _parameters(config: ModelConfig) -> tuple[list[str], str | None]:
    """Our parameter names of `config`'s model (a tied head once, as the embedding) and its tied embedding."""
    with torch.device("meta"):
        model = model_class(config)(config)
    return [n for n, _ in model.named_parameters()], tied_embedding(model)


def rotary_rows(name: str, config: ModelConfig) -> torch.Tensor | None:
    """The rows of our `name` in the Model Zoo's order (theirs = ours[rows]) where it is a Llama q_proj or k_proj
    weight, else None: within each head, rows i and i + head_dim / 2 (a `rotate_half` pair) become rows 2i and
    2i + 1 (a `rotate_every_two` pair), the HF -> CS interleaving of their Llama converter."""
    m = ROTATED.fullmatch(name)
    if m is None:
        return None
    heads = config.n_head if m.group(1) == "q" else config.n_kv_head
    within = torch.arange(config.head_dim).view(2, -1).t().reshape(-1)  # [0, hs/2, 1, hs/2 + 1, ...]
    return (torch.arange(heads)[:, None] * config.head_dim + within).reshape(-1)


def load_cerebras_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict in a Cerebras checkpoint file (`torch.save`, safetensors, or `cstorch.save`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    with path.open("rb") as f:
        hdf5 = f.read(4) == b"\x89HDF"
    if hdf5:
        obj = load_cstorch(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"{path} is not a torch.save checkpoint ({e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (nor one under 'model')")
    return obj


def _cstorch(path: Path) -> ModuleType:
    """`cerebras.pytorch` (`environment.import_cstorch`), needed for the `cstorch.save` (HDF5) file `path`; a
    `CheckpointError` where it cannot be imported."""
    try:
        return import_cstorch()
    except CerebrasError as e:
        raise CheckpointError(
            f"{path} is a cstorch.save HDF5 file, which only cstorch reads and writes: run this in the Cerebras "
            f"venv (scripts/make_cerebras_venv.sh), or there torch.save(cstorch.load('{path}')['model'], "
            f"'model.pt') and import model.pt ({e})"
        ) from e


def load_cstorch(path: str | Path) -> dict[str, Any]:
    """A `cstorch.save` (HDF5) file as plain tensors (cstorch hands out deferred tensors; they are read here).

    Only HDF5 files are handed to `cstorch.load`: for anything else it falls back to `torch.load`, which on
    torch 2.4 unpickles (and so may run) whatever the file holds.
    """
    path = Path(path)
    with path.open("rb") as f:
        if f.read(4) != b"\x89HDF":
            raise CheckpointError(f"{path} is not a cstorch.save (HDF5) file")
    cstorch = _cstorch(path)
    try:
        state = cstorch.load(str(path), map_location="cpu")
    except Exception as e:  # cstorch raises assorted h5py and runtime errors for damaged files
        raise CheckpointError(f"{path} looks like a cstorch.save HDF5 file but cstorch.load failed: {e}") from e

    def materialise(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: materialise(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(materialise(v) for v in value)
        if isinstance(value, np.ndarray):
            return np.array(value)
        return torch.as_tensor(value).clone() if torch.is_tensor(value) else value

    return materialise(state)


def recipe_of(cfg: Config) -> CerebrasRecipe:
    """What a Model Zoo params file says of run `cfg`: network, sparsity, optimizer, loop length and batch."""
    task = asdict(cfg.task) if is_dataclass(cfg.task) else dict(cfg.task)
    train = TrainConfig(**{k: task[k] for k in ("max_steps", "batch_size", "micro_batch_size")})
    return CerebrasRecipe(
        model=cfg.model, sparsity=cfg.sparsity, optim=cfg.optim, train=train, seq_len=cfg.data.seq_len
    )


def modelzoo_metadata(cfg: Config, model_name: str, cstorch_version: str) -> list[dict[str, Any]]:
    """The `__metadata__` the Model Zoo writes into its checkpoints (`ModelZooParamsMetadata`): cstorch's version,
    which `cszoo checkpoint convert` reads to tell the checkpoint's format (it refuses a file without it) and
    the trainer checks for compatibility, the model's class name and the run's params (`to_params`)."""
    return [{"version": cstorch_version, "model_name": model_name, "params": to_params(recipe_of(cfg))}]


def save_cstorch(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (`model`, `optimizer`, `global_step`, `config`, ...) with `cstorch.save` (HDF5)."""
    path = Path(path)
    cstorch = _cstorch(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cstorch.save(state, str(path))
    return path


def checkpoint_to_cstorch(checkpoint: str | Path, path: str | Path) -> Path:
    """One of our checkpoint directories as a cstorch checkpoint file (masks kept as `<param>_mask`).

    It holds `model` (weights and masks), `optimizer`, `global_step`, the Model Zoo's `__metadata__` and our run
    config under `modelzoo_config`, from which `cstorch_to_checkpoint` rebuilds the model.
    """
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint)
    optimizer_state, trainer_state = load_training_state(checkpoint)
    config_yaml = read_config(checkpoint)
    cfg = config_from_yaml(config_yaml)
    state = {
        "model": load_file(str(checkpoint / MODEL_FILE)),
        "optimizer": optimizer_state,
        "global_step": trainer_state["step"],
        "modelzoo_config": config_yaml,
        "__metadata__": modelzoo_metadata(cfg, model_class(cfg.model).__name__, _cstorch(path).__version__),
    }
    return save_cstorch(path, state)


def cstorch_to_checkpoint(path: str | Path, run_dir: str | Path) -> Path:
    """A cstorch checkpoint file written by `checkpoint_to_cstorch` as our checkpoint in `run_dir`.

    Weights, masks and config carry over, as a weights-only checkpoint (the file has no trainer state, so a
    run cannot resume from it, and says so): `modelzoo export`, `generate` and `prune` take it. `run_dir`
    must not hold a checkpoint yet.
    """
    check_run_dir(run_dir, resume=False)
    state = load_cstorch(path)
    if "modelzoo_config" not in state:
        raise CheckpointError(f"{path} has no modelzoo_config: it was not written by checkpoint_to_cstorch")
    config_yaml = state["modelzoo_config"]
    return save_weights(
        run_dir, int(state["global_step"]), _model(state, path, config_from_yaml(config_yaml)), config_yaml
    )


def _model(state: dict[str, Any], path: Path, cfg: Config) -> CausalLM:
    """The model of `cfg` holding the weights and masks of `state["model"]`.

    It is initialised on a fork of torch's CPU generator, so a conversion moves no random state of the caller: a
    backend=cerebras run converts its checkpoints between executors, and SET's regrowth is seeded from it.
    """
    with torch.random.fork_rng(devices=[]):
        model, _ = build_model(cfg)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    tied = tied_embedding(model)
    # A tied head and embedding are one tensor, stored under one of its names.
    if unexpected or len(missing) > 1 or not set(missing) <= ({HEAD, tied} if tied else set()):
        raise CheckpointError(
            f"{path} does not match its config's model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model


# What a backend=cerebras run's checkpoint closure writes with `cstorch.save`: the Cerebras Model Zoo's keys
# (`sparsity` and `grad_scaler` where the run has them), our config and the rest of the loop's state (and
# `modelzoo_identity`, the run identity a resume checks, where the run has one).
RUN_KEYS = ("model", "optimizer", "schedulers", "dataloader", "global_step", "modelzoo_config", "modelzoo_state")


def required_run_keys(config_yaml: str) -> tuple[str, ...]:
    """The keys a training checkpoint of a backend=cerebras run of the config `config_yaml` must hold."""
    cfg = OmegaConf.create(config_yaml)
    scaled = OmegaConf.select(cfg, "task.precision", default="fp32") in ("cbf16", "fp16")
    sparse = config_from_yaml(config_yaml).sparsity.enabled
    return (*RUN_KEYS, *(("sparsity",) if sparse else ()), *(("grad_scaler",) if scaled else ()))


def run_checkpoint_to_checkpoint(path: str | Path, run_dir: str | Path, keep: int) -> Path:
    """A training checkpoint of a backend=cerebras run (`cstorch.save`, Model Zoo keys) as our checkpoint
    directory in `run_dir`, which `task.resume` continues from and `modelzoo export` reads; written on the user
    node after the executor, never inside it. Refused, naming the keys, when any is missing."""
    path = Path(path)
    state = load_cstorch(path)
    missing = [k for k in RUN_KEYS if k not in state]
    if not missing:
        missing = [k for k in required_run_keys(state["modelzoo_config"]) if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} lacks the key(s) {', '.join(missing)} of a backend=cerebras training checkpoint, so "
            "task.resume cannot continue from it: resume from a file that a backend=cerebras run's checkpoint "
            "closure wrote, delete this one to resume from the checkpoint before it, or start a new run_dir "
            "(a Cerebras Model Zoo checkpoint without our config imports as weights with `modelzoo import-cerebras`)"
        )
    trainer_state = {
        **state["modelzoo_state"],
        "step": int(state["global_step"]),
        "scheduler": state["schedulers"][0],
        "sparsity": state.get("sparsity"),
        "grad_scaler": state.get("grad_scaler"),
    }
    model = _model(state, path, config_from_yaml(state["modelzoo_config"]))
    return save_checkpoint(
        run_dir,
        trainer_state["step"],
        model,
        state["optimizer"],
        trainer_state,
        state["modelzoo_config"],
        keep,
        identity=state.get("modelzoo_identity"),
    )


def from_cerebras_state_dict(
    state: dict[str, torch.Tensor], config: ModelConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(our state dict, masks by our parameter name) from a Cerebras GPT or Llama state dict of `config`'s shape.

    Pruned weights come back as exact zeros. A mask of c_attn is the concatenation of q, k and v's masks (True
    where one of them has none); Llama q/k rows and their masks are de-interleaved (`rotary_rows`). Keys left
    over, missing weights and a head that differs from the embeddings of a tied model raise `CheckpointError`.
    """
    if state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    masks = {k.removesuffix(MASK_SUFFIX): v.bool() for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    values: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(MASK_SUFFIX):
            continue
        if value.is_floating_point() and value.isnan().any():  # 1.x sideband: NaN marks a pruned weight
            masks[key] = masks.get(key, torch.ones_like(value, dtype=torch.bool)) & ~value.isnan()
            value = value.nan_to_num(nan=0.0)
        values[key] = value
    used: set[str] = set()

    def take(name: str, ours: str) -> str:
        """The key `name` (or an alias of it) has in `values`, marked used; aliases present must agree."""
        present = [n for n in (name, *ALIASES.get(name, ())) if n in values]
        if not present:
            raise CheckpointError(f"the Cerebras state dict has no {name} (needed for our {ours})")
        for other in present[1:]:
            if not torch.equal(values[other], values[present[0]]):
                raise CheckpointError(f"{present[0]} and {other} differ; the checkpoint is inconsistent")
        used.update(present)
        return present[0]

    names, tied = _parameters(config)
    ours_state, ours_masks = {}, {}
    for ours in names:
        keys = [take(n, ours) for n in cerebras_names(ours)]
        ours_state[ours] = torch.cat([values[k] for k in keys])
        if any(k in masks for k in keys):
            ours_masks[ours] = torch.cat([masks.get(k, torch.ones_like(values[k], dtype=torch.bool)) for k in keys])
            used.update(k for k in keys if k in masks)
        rows = rotary_rows(ours, config)
        if rows is not None:
            back = torch.argsort(rows)
            ours_state[ours] = ours_state[ours][back]
            if ours in ours_masks:
                ours_masks[ours] = ours_masks[ours][back]
    if tied is not None:
        head = values.get(HEAD)
        if head is not None:
            if not torch.equal(head, ours_state[tied]):
                raise CheckpointError(
                    f"{HEAD} differs from the word embeddings, which this model ties (share_embedding_weights): "
                    "untied heads cannot be imported into it"
                )
            used.add(HEAD)
        ours_state[HEAD] = ours_state[tied]
    left = sorted(set(values) - used) + sorted(f"{k}{MASK_SUFFIX}" for k in set(masks) - used - set(values))
    if left:
        raise CheckpointError(
            f"the Cerebras state dict holds {len(left)} tensors this {config.family} has no place for: {left[:5]}"
        )
    return ours_state, ours_masks


def to_cerebras_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict of `config`'s model (with `<param>_mask` buffers) in Cerebras Model Zoo 2.1+ names, pruned
    weights at zero, Llama q/k rows interleaved (`rotary_rows`)."""
    tied = _parameters(config)[1]
    out: dict[str, torch.Tensor] = {}
    for ours, value in state.items():
        if ours.endswith(MASK_SUFFIX) or (tied and ours == HEAD):
            continue
        mask = state.get(ours + MASK_SUFFIX)
        if mask is not None:
            value = value.masked_fill(~mask, 0)
        rows = rotary_rows(ours, config)
        if rows is not None:
            value, mask = value[rows], None if mask is None else mask[rows]
        theirs = [WRITTEN.get(n, n) for n in cerebras_names(ours)]
        if not theirs:
            raise CheckpointError(f"{ours} has no Cerebras Model Zoo name")
        for name, part, part_mask in zip(
            theirs,
            value.chunk(len(theirs)),
            mask.chunk(len(theirs)) if mask is not None else [None] * len(theirs),
            strict=True,
        ):
            out[name] = part.clone()
            if part_mask is not None:
                out[name + MASK_SUFFIX] = part_mask.clone()
    if tied:
        out[HEAD] = out[cerebras_names(tied)[0]]
    return out


def import_cerebras(params: str | Path, checkpoint: str | Path, run_dir: str | Path, seed: int = 1234) -> Path:
    """Write a Cerebras GPT or Llama checkpoint (with its params YAML) as checkpoint `step_000000` of `run_dir`.

    The params file decides which weights are sparse; the checkpoint must hold a mask (or NaN entries) for
    exactly those, unless the params are dense, in which case its masks are baked in as zeros. The result holds
    weights, masks and config (no optimizer state): `modelzoo export`, `generate` and `prune` read it, and
    `modelzoo pretrain task.init_from=<its export>` continues training from it.
    """
    recipe = read_params(params)
    check_run_dir(run_dir, resume=False)
    weights, masks = from_cerebras_state_dict(load_cerebras_state_dict(checkpoint), recipe.model)
    cfg = Config(
        model=recipe.model,
        sparsity=recipe.sparsity,
        optim=recipe.optim,
        data=DataConfig(seq_len=recipe.seq_len),
        task=recipe.train,
        seed=seed,
        run_dir=str(run_dir),
    )
    model, sparsity = build_model(cfg)
    sparse: list[str] = []
    if sparsity:
        sparse = [n.removesuffix(MASK_SUFFIX) for n in sparsity.mask_names()]
        for names, why in ((set(masks) - set(sparse), "masks"), (set(sparse) - set(masks), "no masks")):
            if names:
                raise CheckpointError(
                    f"{checkpoint} has {why} for {sorted(names)[:3]} but {params} makes sparse exactly "
                    f"{sparse[:3]}...; import it with the params file it was trained with"
                )
    state = {**weights, **{f"{n}{MASK_SUFFIX}": masks[n] for n in sparse}}
    for name, mask in masks.items():  # pruned weights are exact zeros, sparse config or not
        state[name] = state[name].masked_fill(~mask, 0)
    model.load_state_dict(state, strict=True)
    return save_weights(run_dir, 0, model, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def export_cerebras(checkpoint: str | Path, output_dir: str | Path) -> tuple[Path, Path]:
    """One of our checkpoints as a Cerebras Model Zoo `params.yaml` and `model.mdl` (`{"model": state_dict}`)."""
    run = restore_model(checkpoint)
    model, cfg = run.model, run.config
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as directory:
        write_params(recipe_of(cfg), directory / "params.yaml")
        state = to_cerebras_state_dict(unpad_vocab(model.state_dict(), model.config), model.config)
        torch.save({"model": state}, directory / "model.mdl")
    return output_dir / "params.yaml", output_dir / "model.mdl"

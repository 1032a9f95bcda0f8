"""Hugging Face export and import: our GPT <-> `transformers.GPT2LMHeadModel`, our Llama <-> `LlamaForCausalLM`.

Our parameter names are HF's, so conversion is a rename table per family (litgpt style; `hf_gpt2`, `hf_llama`):
bake each sparsity mask into its weight (exact zeros), drop the mask buffers, and apply the family's table. Both
directions refuse what the other side cannot represent instead of converting it approximately. A padded vocabulary
(`padded_vocab_multiple`) is cut back to `vocab_size` rows on export (HF's model then computes the same logits)
and padded again on import when asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from modelzoo.atomic import atomic_directory
from modelzoo.checkpoint import SLACK_BYTES, state_bytes
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.export import hf_gpt2, hf_llama
from modelzoo.finite import refuse_nonfinite
from modelzoo.models.registry import CausalLM, ModelConfig, build_model, pad_vocab, unpad_vocab
from modelzoo.sparsity.masks import MASK_SUFFIX, attach_mask

SPARSITY_FILE = "sparsity.json"
MEASURED_KEYS = ("global_sparsity", "per_tensor")
TIED_KEY = "lm_head.weight"  # every family's head; left out of a tied export, taken from the embedding on import
TABLES: dict[str, ModuleType] = {"gpt": hf_gpt2, "llama": hf_llama}  # our family -> its HF rename table
BY_MODEL_TYPE = {table.MODEL_TYPE: table for table in TABLES.values()}


def hf_table(hf_config: PretrainedConfig, where: str | os.PathLike) -> ModuleType:
    """The rename table of an HF config's `model_type`; any other is a `CheckpointError` naming `where`."""
    table = BY_MODEL_TYPE.get(hf_config.model_type)
    if table is None:
        raise CheckpointError(
            f"{where}: model_type {hf_config.model_type!r} cannot be imported; only {sorted(BY_MODEL_TYPE)}"
        )
    return table


def hf_model_class(config: ModelConfig) -> type[PreTrainedModel]:
    """The Hugging Face causal LM class of `config`'s family (`GPT2LMHeadModel`, `LlamaForCausalLM`)."""
    return TABLES[config.family].HF_MODEL


def to_hf_config(
    config: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> PretrainedConfig:
    """The Hugging Face config (`GPT2Config`, `LlamaConfig`) of the same network."""
    return TABLES[config.family].to_hf_config(config, bos_token_id, eos_token_id)


def from_hf_config(hf: PretrainedConfig, name: str = "hf") -> ModelConfig:
    """Our config for a Hugging Face config; raises `ConfigError` for options our model cannot represent."""
    return hf_table(hf, hf.name_or_path or type(hf).__name__).from_hf_config(hf, name)


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF weights from our `state_dict`: masks baked in as exact zeros and dropped, names and layouts HF's."""
    masks = {key.removesuffix(MASK_SUFFIX): mask for key, mask in state_dict.items() if key.endswith(MASK_SUFFIX)}
    orphans = sorted(masks.keys() - state_dict.keys())
    if orphans:
        raise CheckpointError(f"masks without their weights in the state dict: {orphans}")
    baked = {
        key: value.masked_fill(~masks[key], 0) if key in masks else value
        for key, value in state_dict.items()
        if not key.endswith(MASK_SUFFIX)
    }
    return TABLES[config.family].to_hf_state(baked)


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our `state_dict` from HF weights of `config`'s family."""
    return TABLES[config.family].from_hf_state(hf_state_dict)


def sparsity_report(hf_state: dict[str, torch.Tensor], masked: list[str], sparsity_info: dict | None = None) -> dict:
    """Contents of `sparsity.json`: measured fraction of exact zeros per masked weight and over all of them.

    `sparsity_info` (algorithm, target sparsity, step, ...) is merged in and may override `pattern`.
    """
    info = dict(sparsity_info or {})
    clashes = sorted(set(MEASURED_KEYS) & info.keys())
    if clashes:
        raise ValueError(f"sparsity_info keys {clashes} are measured by the export; remove them")
    zeros = {name: int((hf_state[name] == 0).sum()) for name in masked}
    numel = {name: hf_state[name].numel() for name in masked}
    return {
        "pattern": "unstructured",
        **info,
        "global_sparsity": sum(zeros.values()) / max(sum(numel.values()), 1),
        "per_tensor": {name: zeros[name] / numel[name] for name in masked},
    }


def _build_hf_model(
    config: ModelConfig, hf_state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase | None
) -> PreTrainedModel:
    """The HF causal LM holding `hf_state`, every key checked, with special token ids set for `generate`."""
    bos, eos = (tokenizer.bos_token_id, tokenizer.eos_token_id) if tokenizer is not None else (None, None)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{config.vocab_size} < the tokenizer's {len(tokenizer)} tokens; pass the model's own tokenizer",
        )
    hf_class = hf_model_class(config)
    hf_model = hf_class(to_hf_config(config, bos, eos)).to(next(iter(hf_state.values())).dtype)
    result = hf_model.load_state_dict(hf_state, strict=False)
    tied = {TIED_KEY} if hf_model.config.tie_word_embeddings else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"state dict does not match {hf_class.__name__}: missing {missing}, unexpected {result.unexpected_keys}"
        )
    generation = hf_model.generation_config
    generation.bos_token_id, generation.eos_token_id, generation.pad_token_id = bos, eos, eos
    return hf_model.eval()


def export_hf(
    model: CausalLM,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    sparsity_info: dict | None = None,
) -> Path:
    """Write `model` as a safetensors HF causal-LM directory with masks baked in, plus `sparsity.json`.

    Args:
        model: our GPT or Llama, optionally with `<param>_mask` buffers from the sparsity plug-in.
        output_dir: target directory; an existing one is replaced only once the new export is complete.
        tokenizer: saved alongside; its bos/eos ids go into the config, eos doubles as `pad_token_id`.
        sparsity_info: extra `sparsity.json` entries (algorithm, target sparsity, step, ...).

    Returns:
        The output directory.
    """
    output_dir = Path(output_dir)
    state = unpad_vocab(model.state_dict(), model.config)
    refuse_nonfinite(state.items(), f"export to {output_dir}", "nothing was exported")
    hf_state = to_hf_state_dict(state, model.config)
    masked = [key.removesuffix(MASK_SUFFIX) for key in state if key.endswith(MASK_SUFFIX)]
    report = sparsity_report(hf_state, masked, sparsity_info)
    hf_model = _build_hf_model(model.config, hf_state, tokenizer)
    return save_hf_directory(hf_model, output_dir, tokenizer, report)


def save_hf_directory(
    hf_model: PreTrainedModel,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None,
    report: dict,
) -> Path:
    """`save_pretrained` of the model and tokenizer plus `sparsity.json`, replacing `output_dir` atomically."""
    output_dir = Path(output_dir)
    with atomic_directory(output_dir, state_bytes(hf_model.state_dict()) + SLACK_BYTES) as directory:
        hf_model.save_pretrained(directory, safe_serialization=True)
        add_legacy_rope_keys(directory / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        (directory / SPARSITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return output_dir


def add_legacy_rope_keys(config_file: Path) -> None:
    """Write RoPE settings also the transformers 4.x way (`rope_theta`, `rope_scaling`) beside 5.x's
    `rope_parameters`, so an export loads with the same positions in either (4.x ignores `rope_parameters`, and
    torch 2.4, which cerebras-pytorch pins, runs transformers 4.x only). Nothing for a model without RoPE."""
    config = json.loads(config_file.read_text())
    rope = config.get("rope_parameters")
    if not rope or config.get("rope_theta") is not None:
        return
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_hf(directory: str | os.PathLike, padded_vocab_multiple: int = 1) -> CausalLM:
    """Our model from a local `GPT2LMHeadModel` or `LlamaForCausalLM` directory (weights dense; pruned entries stay
    exact zeros), its vocabulary padded to a multiple of `padded_vocab_multiple` rows."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"{directory}: no config.json; expected a directory written by export_hf or save_pretrained"
        )
    hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    table = hf_table(hf_config, directory)
    config = table.from_hf_config(hf_config, name=directory.name)
    config.padded_vocab_multiple = padded_vocab_multiple
    hf_model, info = table.HF_MODEL.from_pretrained(
        directory, config=hf_config, local_files_only=True, output_loading_info=True
    )
    missing = sorted(set(info["missing_keys"]) - ({TIED_KEY} if hf_config.tie_word_embeddings else set()))
    if missing:
        raise CheckpointError(f"{directory}: weights missing from the checkpoint: {missing}")
    model = build_model(config)
    model.load_state_dict(pad_vocab(table.from_hf_state(hf_model.state_dict()), config))
    refuse_nonfinite(model.state_dict().items(), directory, "it cannot be used; export an earlier checkpoint")
    return model


def restore_masks(model: CausalLM, directory: str | os.PathLike) -> list[str]:
    """Re-create the `<param>_mask` buffers of the tensors `sparsity.json` in `directory` lists; return their names.

    The export baked each mask into exact zeros, so a mask is recovered as `weight != 0`: a kept weight that was
    exactly 0.0 comes back pruned, which changes no output. A directory without `sparsity.json` gives no masks.
    """
    report = Path(directory) / SPARSITY_FILE
    names = list(json.loads(report.read_text())["per_tensor"]) if report.is_file() else []
    for name in names:
        attach_mask(model, name, model.get_parameter(name).detach() != 0)
    return names

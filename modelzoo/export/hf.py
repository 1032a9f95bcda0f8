"""Hugging Face export and import: our GPT <-> `transformers.GPT2LMHeadModel`.

Our parameter names are HF GPT-2's, so conversion is a table (litgpt style): bake each sparsity mask
into its weight (exact zeros), drop the mask buffers, transpose the four projections between
`nn.Linear` (out, in) and HF's `Conv1D` (in, out), and leave `lm_head.weight` to the tied embedding.
Both directions refuse what the other side cannot represent instead of converting it approximately.
A padded vocabulary (`GPTConfig.padded_vocab_multiple`) is cut back to `vocab_size` rows on export (HF's
model then computes the same logits) and padded again on import when asked.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

from modelzoo.atomic import atomic_directory
from modelzoo.checkpoint import SLACK_BYTES, state_bytes
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.finite import refuse_nonfinite
from modelzoo.models.gpt import ACTIVATIONS, GPT, GPTConfig, pad_vocab, unpad_vocab
from modelzoo.sparsity.masks import MASK_SUFFIX, attach_mask

# The four projections HF GPT-2 stores as Conv1D (in, out); nn.Linear stores (out, in).
CONV1D_WEIGHT = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
TIED_KEY = "lm_head.weight"
TIED_SOURCE = "transformer.wte.weight"
# Causal-mask buffers that older transformers versions wrote into GPT-2 checkpoints.
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
SPARSITY_FILE = "sparsity.json"
MEASURED_KEYS = ("global_sparsity", "per_tensor")

# HF GPT-2 options our GPT implements only at one value: (field, that value, what our GPT does instead).
FIXED_OPTIONS = (
    ("scale_attn_weights", True, "our attention always scales scores by 1/sqrt(head_dim)"),
    ("scale_attn_by_inverse_layer_idx", False, "our attention has no extra 1/(layer_idx + 1) scaling"),
    ("reorder_and_upcast_attn", False, "our attention has no reordered fp32-upcast variant"),
    ("add_cross_attention", False, "our GPT is decoder-only, without cross-attention"),
    ("tie_word_embeddings", True, "our lm_head is tied to transformer.wte"),
)


def to_hf_config(config: GPTConfig, bos_token_id: int | None = None, eos_token_id: int | None = None) -> GPT2Config:
    """The `GPT2Config` of the same network (one dropout rate for residual, embedding and attention)."""
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.n_inner,
        activation_function=config.activation,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.init_std,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )


def from_hf_config(hf: GPT2Config, name: str = "hf") -> GPTConfig:
    """Our `GPTConfig` for a `GPT2Config`; raises `ConfigError` for options our GPT cannot represent."""
    where = f"{hf.name_or_path}/config.json" if hf.name_or_path else "GPT2Config"
    for field, supported, ours in FIXED_OPTIONS:
        value = getattr(hf, field)
        if value != supported:
            raise ConfigError(
                f"{field} in {where}", f"{value!r} cannot be imported: {ours} (only {supported!r} converts)"
            )
    if hf.activation_function not in ACTIVATIONS:
        raise ConfigError(
            f"activation_function in {where}", f"{hf.activation_function!r} is not implemented", ACTIVATIONS
        )
    dropouts = {hf.resid_pdrop, hf.embd_pdrop, hf.attn_pdrop}
    if len(dropouts) > 1:
        raise ConfigError(
            f"resid_pdrop/embd_pdrop/attn_pdrop in {where}",
            f"{hf.resid_pdrop}/{hf.embd_pdrop}/{hf.attn_pdrop} differ; our GPT has one dropout rate for all three",
        )
    return GPTConfig(
        name=name,
        n_layer=hf.n_layer,
        n_embd=hf.n_embd,
        n_head=hf.n_head,
        n_inner=hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd,
        n_positions=hf.n_positions,
        vocab_size=hf.vocab_size,
        activation=hf.activation_function,
        layer_norm_epsilon=hf.layer_norm_epsilon,
        dropout=float(hf.resid_pdrop),
        init_std=hf.initializer_range,
    )


def _transpose_conv1d(key: str, value: torch.Tensor) -> torch.Tensor:
    """Swap nn.Linear (out, in) and Conv1D (in, out) layouts; the map is its own inverse."""
    return value.t().contiguous() if CONV1D_WEIGHT.fullmatch(key) else value


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`GPT2LMHeadModel` weights from our `state_dict`: masks baked in as exact zeros, tied head left out."""
    masks = {key.removesuffix(MASK_SUFFIX): mask for key, mask in state_dict.items() if key.endswith(MASK_SUFFIX)}
    orphans = sorted(masks.keys() - state_dict.keys())
    if orphans:
        raise CheckpointError(f"masks without their weights in the state dict: {orphans}")
    hf_state = {}
    for key, value in state_dict.items():
        if key.endswith(MASK_SUFFIX) or key == TIED_KEY:
            continue
        if key in masks:
            value = value.masked_fill(~masks[key], 0)
        hf_state[key] = _transpose_conv1d(key, value)
    return hf_state


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `state_dict` from `GPT2LMHeadModel` weights; HF's causal-mask buffers are dropped."""
    head = hf_state_dict.get(TIED_KEY)
    if head is not None and not torch.equal(head, hf_state_dict[TIED_SOURCE]):
        raise CheckpointError(f"{TIED_KEY} differs from {TIED_SOURCE}: untied embeddings cannot be imported")
    state = {
        key: _transpose_conv1d(key, value)
        for key, value in hf_state_dict.items()
        if key != TIED_KEY and not key.endswith(HF_MASK_BUFFERS)
    }
    state[TIED_KEY] = state[TIED_SOURCE]
    return state


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
    config: GPTConfig, hf_state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase | None
) -> GPT2LMHeadModel:
    """A `GPT2LMHeadModel` holding `hf_state`, every key checked, with special token ids set for `generate`."""
    bos, eos = (tokenizer.bos_token_id, tokenizer.eos_token_id) if tokenizer is not None else (None, None)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{config.vocab_size} < the tokenizer's {len(tokenizer)} tokens; pass the model's own tokenizer",
        )
    hf_model = GPT2LMHeadModel(to_hf_config(config, bos, eos)).to(hf_state[TIED_SOURCE].dtype)
    result = hf_model.load_state_dict(hf_state, strict=False)
    missing = sorted(set(result.missing_keys) - {TIED_KEY})
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"state dict does not match GPT2LMHeadModel: missing {missing}, unexpected {result.unexpected_keys}"
        )
    generation = hf_model.generation_config
    generation.bos_token_id, generation.eos_token_id, generation.pad_token_id = bos, eos, eos
    return hf_model.eval()


def export_hf(
    model: GPT,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    sparsity_info: dict | None = None,
) -> Path:
    """Write `model` as a safetensors `GPT2LMHeadModel` directory with masks baked in, plus `sparsity.json`.

    Args:
        model: our GPT, optionally with `<param>_mask` buffers from the sparsity plug-in.
        output_dir: target directory; an existing one is replaced only once the new export is complete.
        tokenizer: saved alongside; its bos/eos ids go into the config, eos doubles as `pad_token_id`.
        sparsity_info: extra `sparsity.json` entries (algorithm, target sparsity, step, ...).

    Returns:
        The output directory.
    """
    output_dir = Path(output_dir)
    state = unpad_vocab(model.state_dict(), model.config)
    refuse_nonfinite(state.items(), f"export to {output_dir}", "nothing was exported")
    hf_state = to_hf_state_dict(state)
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
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        (directory / SPARSITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return output_dir


def load_hf(directory: str | os.PathLike, padded_vocab_multiple: int = 1) -> GPT:
    """Our GPT from a local `GPT2LMHeadModel` directory (weights dense; pruned entries stay exact zeros), its
    vocabulary padded to a multiple of `padded_vocab_multiple` rows."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"{directory}: no config.json; expected a directory written by export_hf or save_pretrained"
        )
    hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if not isinstance(hf_config, GPT2Config):
        raise CheckpointError(f"{directory}: model_type {hf_config.model_type!r} cannot be imported; only 'gpt2'")
    config = from_hf_config(hf_config, name=directory.name)
    config.padded_vocab_multiple = padded_vocab_multiple
    hf_model, info = GPT2LMHeadModel.from_pretrained(
        directory, config=hf_config, local_files_only=True, output_loading_info=True
    )
    missing = sorted(set(info["missing_keys"]) - {TIED_KEY})
    if missing:
        raise CheckpointError(f"{directory}: weights missing from the checkpoint: {missing}")
    model = GPT(config)
    model.load_state_dict(pad_vocab(from_hf_state_dict(hf_model.state_dict()), config))
    refuse_nonfinite(model.state_dict().items(), directory, "it cannot be used; export an earlier checkpoint")
    return model


def restore_masks(model: GPT, directory: str | os.PathLike) -> list[str]:
    """Re-create the `<param>_mask` buffers of the tensors `sparsity.json` in `directory` lists; return their names.

    The export baked each mask into exact zeros, so a mask is recovered as `weight != 0`: a kept weight that was
    exactly 0.0 comes back pruned, which changes no output. A directory without `sparsity.json` gives no masks.
    """
    report = Path(directory) / SPARSITY_FILE
    names = list(json.loads(report.read_text())["per_tensor"]) if report.is_file() else []
    for name in names:
        attach_mask(model, name, model.get_parameter(name).detach() != 0)
    return names

"""Hugging Face GPT-2 conversion: our `GPTConfig` and GPT weights <-> `transformers.GPT2LMHeadModel`'s.

Our parameter names are HF GPT-2's, so the table is short: transpose the four projections between `nn.Linear`
(out, in) and HF's `Conv1D` (in, out), and leave `lm_head.weight` to the tied embedding. Both directions refuse
what the other side cannot represent instead of converting it approximately. `modelzoo.export.hf` dispatches here.
"""

from __future__ import annotations

import re

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PretrainedConfig

from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.models.gpt import ACTIVATIONS, GPTConfig

MODEL_TYPE = "gpt2"
HF_MODEL = GPT2LMHeadModel
HF_SEQ_CLS = GPT2ForSequenceClassification  # `export.seq_cls`: the backbone's weights plus `score`

# The four projections HF GPT-2 stores as Conv1D (in, out); nn.Linear stores (out, in).
CONV1D_WEIGHT = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
TIED_KEY = "lm_head.weight"
TIED_SOURCE = "transformer.wte.weight"
# Causal-mask buffers that older transformers versions wrote into GPT-2 checkpoints.
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")

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


def refuse_fixed_options(hf: PretrainedConfig, options: tuple[tuple[str, object, str], ...]) -> str:
    """Where `hf` came from (`<dir>/config.json`), after refusing any of `options` (field, the one value we
    implement, what we do instead) that `hf` sets otherwise, naming the field."""
    where = f"{hf.name_or_path}/config.json" if hf.name_or_path else type(hf).__name__
    for field, supported, ours in options:
        value = getattr(hf, field, supported)
        if value != supported:
            raise ConfigError(
                f"{field} in {where}", f"{value!r} cannot be imported: {ours} (only {supported!r} converts)"
            )
    return where


def from_hf_config(hf: GPT2Config, name: str = "hf") -> GPTConfig:
    """Our `GPTConfig` for a `GPT2Config`; raises `ConfigError` for options our GPT cannot represent."""
    where = refuse_fixed_options(hf, FIXED_OPTIONS)
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


def to_hf_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`GPT2LMHeadModel` weights from our (mask-free) `state_dict`: projections transposed, tied head left out."""
    return {key: _transpose_conv1d(key, value) for key, value in state_dict.items() if key != TIED_KEY}


def from_hf_state(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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

"""Hugging Face Llama conversion: our `LlamaConfig` and Llama weights <-> `transformers.LlamaForCausalLM`'s.

Our parameter names and layouts are HF Llama's, so the weight table is the identity. The config table maps our field
names to HF's; RoPE settings are given as `rope_theta` and `rope_scaling` (Llama-3 scaling: `rope_type: llama3`
with its four keys), which transformers 4.x reads and 5.x folds into `rope_parameters`; an export's `config.json`
holds both forms (`hf.add_legacy_rope_keys`), and either is read back. Options our Llama does not implement are
refused naming the key.
`modelzoo.export.hf` dispatches here.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from modelzoo.errors import ConfigError
from modelzoo.export.hf_gpt2 import refuse_fixed_options
from modelzoo.models.llama import LlamaConfig, RopeScaling

MODEL_TYPE = "llama"
HF_MODEL = LlamaForCausalLM
HF_SEQ_CLS = LlamaForSequenceClassification  # `export.seq_cls`: the backbone's weights plus `score`
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# HF Llama options our Llama implements only at one value: (field, that value, what our Llama does instead).
FIXED_OPTIONS = (
    ("hidden_act", "silu", "our MLP is SwiGLU (SiLU gate)"),
    ("attention_bias", False, "our projections have no biases"),
    ("mlp_bias", False, "our projections have no biases"),
    ("attention_dropout", 0.0, "our attention has no dropout"),
    ("pretraining_tp", 1, "our projections are not split for tensor-parallel emulation"),
)


def to_hf_config(
    config: LlamaConfig, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> HFLlamaConfig:
    """The `transformers.LlamaConfig` of the same network."""
    scaling = None
    if config.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **{k: getattr(config.rope_scaling, k) for k in SCALING_KEYS}}
    return HFLlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.n_inner,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.n_positions,
        rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_word_embeddings,
        # The 4.x keys, which transformers 5.x folds into `rope_parameters`: one call for both versions.
        rope_theta=config.rope_theta,
        rope_scaling=scaling,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def from_hf_config(hf: HFLlamaConfig, name: str = "hf") -> LlamaConfig:
    """Our `LlamaConfig` for a `transformers.LlamaConfig`; raises `ConfigError` for what our Llama cannot represent."""
    where = refuse_fixed_options(hf, FIXED_OPTIONS)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise ConfigError(
            f"head_dim in {where}",
            f"{head_dim} x num_attention_heads={hf.num_attention_heads} != hidden_size={hf.hidden_size}; "
            "our Llama has head_dim = hidden_size / num_attention_heads",
        )
    rope = dict(getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta, **(hf.rope_scaling or {})})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ConfigError(
            f"rope_parameters.rope_type in {where}", f"{rope_type!r} cannot be imported", ["default", "llama3"]
        )
    scaling = RopeScaling(**{k: rope[k] for k in SCALING_KEYS}) if rope_type == "llama3" else None
    return LlamaConfig(
        name=name,
        n_layer=hf.num_hidden_layers,
        n_embd=hf.hidden_size,
        n_head=hf.num_attention_heads,
        n_kv_head=hf.num_key_value_heads or hf.num_attention_heads,
        n_inner=hf.intermediate_size,
        n_positions=hf.max_position_embeddings,
        vocab_size=hf.vocab_size,
        rope_theta=float(rope["rope_theta"]),
        rope_scaling=scaling,
        rms_norm_eps=hf.rms_norm_eps,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        init_std=hf.initializer_range,
    )


def to_hf_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` weights from our (mask-free) `state_dict`: the same names (a tied head loads as the
    embedding it is)."""
    return dict(state_dict)


def from_hf_state(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `state_dict` from `LlamaForCausalLM` weights: the same names, a head left out taken from the embedding
    (a tied checkpoint's)."""
    state = dict(hf_state_dict)
    state.setdefault(HEAD, state[EMBEDDING])
    return state

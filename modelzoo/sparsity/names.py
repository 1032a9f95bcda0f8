"""Which parameters are sparse: glob filters over our names and their Cerebras Model Zoo equivalents.

Our names are HF GPT-2's and HF Llama's; Cerebras' GPT-2/GPT-3 and Llama models name the same weights
differently. Each of our parameters is matched under both spellings, so a Cerebras recipe's `param_filter`
selects the same weights here. Tables after the Cerebras Model Zoo's GPT-2 and Llama HF<->CS checkpoint
converters (Llama: `gate_proj` is `ffn.ffn.0.linear_layer_for_glu`, `up_proj` `ffn.ffn.0.linear_layer`).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from torch import nn

# (our name pattern, Cerebras name templates); the block index is carried over as {i}.
CEREBRAS_NAMES: list[tuple[str, tuple[str, ...]]] = [
    (r"transformer\.wte\.(\w+)", ("embedding_layer.word_embeddings.{0}",)),
    (r"transformer\.wpe\.(\w+)", ("embedding_layer.position_embeddings.{0}",)),
    (r"transformer\.h\.(\d+)\.ln_1\.(\w+)", ("transformer_decoder.layers.{i}.norm1.{0}",)),
    (
        r"transformer\.h\.(\d+)\.attn\.c_attn\.(\w+)",
        tuple(f"transformer_decoder.layers.{{i}}.self_attn.proj_{x}_dense_layer.{{0}}" for x in "qkv"),
    ),
    (
        r"transformer\.h\.(\d+)\.attn\.c_proj\.(\w+)",
        ("transformer_decoder.layers.{i}.self_attn.proj_output_dense_layer.{0}",),
    ),
    (r"transformer\.h\.(\d+)\.ln_2\.(\w+)", ("transformer_decoder.layers.{i}.norm3.{0}",)),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.(\w+)", ("transformer_decoder.layers.{i}.ffn.ffn.0.linear_layer.{0}",)),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.(\w+)", ("transformer_decoder.layers.{i}.ffn.ffn.1.linear_layer.{0}",)),
    (r"transformer\.ln_f\.(\w+)", ("transformer_decoder.norm.{0}",)),
    (r"model\.embed_tokens\.(\w+)", ("embedding_layer.word_embeddings.{0}",)),
    (r"model\.layers\.(\d+)\.input_layernorm\.(\w+)", ("transformer_decoder.layers.{i}.norm1.{0}",)),
    *(
        (
            rf"model\.layers\.(\d+)\.self_attn\.{x}_proj\.(\w+)",
            (f"transformer_decoder.layers.{{i}}.self_attn.{cs}.{{0}}",),
        )
        for x, cs in (
            ("q", "proj_q_dense_layer"),
            ("k", "proj_k_dense_layer"),
            ("v", "proj_v_dense_layer"),
            ("o", "proj_output_dense_layer"),
        )
    ),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.(\w+)", ("transformer_decoder.layers.{i}.norm3.{0}",)),
    *(
        (rf"model\.layers\.(\d+)\.mlp\.{x}_proj\.(\w+)", (f"transformer_decoder.layers.{{i}}.ffn.ffn.{cs}.{{0}}",))
        for x, cs in (("gate", "0.linear_layer_for_glu"), ("up", "0.linear_layer"), ("down", "1.linear_layer"))
    ),
    (r"model\.norm\.(\w+)", ("transformer_decoder.norm.{0}",)),
    (r"lm_head\.(\w+)", ("lm_head.{0}",)),  # a head of its own (untied Llama); GPT's is the word embedding
]

# Cerebras' default filter: >1-D parameters whose names contain none of these.
CEREBRAS_DEFAULT_EXCLUDE = ("embedding", "norm", "lm_head", "pe_helper")


def cerebras_names(name: str) -> tuple[str, ...]:
    """The Cerebras Model Zoo spellings of one of our parameter names (empty if it has none)."""
    for pattern, templates in CEREBRAS_NAMES:
        m = re.fullmatch(pattern, name)
        if m:
            if m.re.groups == 2:
                return tuple(t.format(m.group(2), i=m.group(1)) for t in templates)
            return tuple(t.format(m.group(1)) for t in templates)
    return ()


def is_default_sparse(name: str, ndim: int) -> bool:
    """Cerebras' default `param_filter`, judged on the Cerebras spelling of the name."""
    spellings = cerebras_names(name) or (name,)
    return ndim > 1 and not any(word in s for s in spellings for word in CEREBRAS_DEFAULT_EXCLUDE)


def as_globs(param_filter: str | list[str] | None) -> list[str] | None:
    """A `param_filter` as a list of globs (one glob may be given alone); None stays None (the default)."""
    if param_filter is None:
        return None
    return [param_filter] if isinstance(param_filter, str) else list(param_filter)


def matches(name: str, globs: list[str]) -> bool:
    """True if any glob matches our name or one of its Cerebras spellings."""
    spellings = (name, *cerebras_names(name))
    return any(fnmatchcase(s, g) for s in spellings for g in globs)


def select_parameters(model: nn.Module, globs: list[str] | None) -> list[str]:
    """Names of the parameters a filter selects (`None`: Cerebras' default). Tied weights appear once."""
    return [
        name
        for name, p in model.named_parameters()
        if (is_default_sparse(name, p.ndim) if globs is None else matches(name, globs))
    ]

"""Llama decoder with Hugging Face `LlamaForCausalLM` architecture and parameter names.

Pre-RMSNorm blocks, rotary position embeddings (optionally with Llama-3 frequency scaling), a SwiGLU MLP,
grouped-query attention (`n_kv_head` key/value heads shared by `n_head // n_kv_head` query heads each), no
biases, and an LM head that is tied to the embedding only when the config says so (Llama 3.2 1B/3B tie it,
Llama 2 and Llama 3 8B do not). Module names are HF's (`model.layers.N.self_attn.q_proj`, ...), all
`nn.Linear` (out, in) as in HF, so conversion is a plain rename table. Rotary embeddings follow HF's
`rotate_half` convention (a head's first and second halves are the pairs, not interleaved entries).

The module is plain PyTorch: it knows nothing of sparsity, config files, devices or distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelzoo.models.common import (
    SDPA_HAS_GQA,
    DecoderLM,
    DecoderShape,
    KVCache,
    activation_bytes,
    causal_attention,
    check_positions,
)


@dataclass
class RopeScaling:
    """Llama-3 RoPE frequency scaling (transformers' `rope_type: llama3`; Llama 3.1 and 3.2 use it).

    Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are stretched by `factor`,
    those shorter than `original_max_position_embeddings / high_freq_factor` are kept, and the ones between
    are interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class LlamaConfig(DecoderShape):
    """Shape of a Llama model, in the same field names as `GPTConfig`. Sizes live in `conf/model/llama*.yaml`."""

    name: str = "llama_tiny"
    family: str = "llama"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    n_inner: int = 352
    n_positions: int = 128
    vocab_size: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # As GPTConfig's: embedding and head rows padded to a multiple of this; the padded rows are never predicted.
    padded_vocab_multiple: int = 1


def rope_frequencies(config: LlamaConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32, Llama-3-scaled when `config.rope_scaling` is set.

    The same float32 operations as transformers' `compute_default_rope_parameters` and
    `_compute_llama3_parameters`, so the rotations match HF's bit for bit.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)  # long waves: stretched
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(config: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos and sin (T, hs) of `positions` (T,), computed in fp32 and cast to `dtype` as HF does."""
    freqs = positions.float()[:, None] * rope_frequencies(config, positions.device)  # (T, hs / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs): the same angle for entries i and i + hs / 2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs / 2]) of `x` (B, nh, T, hs) by its position's angle (`rotate_half`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias, computed in fp32 (as HF's `LlamaRMSNorm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # index into a KVCache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv = config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, kv, bias=False)  # GQA: fewer key/value heads
        self.v_proj = nn.Linear(config.n_embd, kv, bias=False)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv, past + T, hs)
        y = causal_attention(q, k, v, past)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.n_inner, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.n_inner, bias=False)
        self.down_proj = nn.Linear(config.n_inner, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(DecoderLM):
    """Llama language model; `forward` returns logits (B, T, vocab) and, given targets, the mean CE loss.

    The interface is GPT's (`modelzoo.models.registry.CausalLM`): `hidden`, `forward` with an optional
    `KVCache` and `prefix` embeddings, `new_cache`, `blocks`, `embedding`, `num_params`.
    """

    VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")
    EMBEDDINGS = ("model.embed_tokens.weight",)

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.padded_vocab_size, config.n_embd),
                layers=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
                norm=RMSNorm(config.n_embd, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    @staticmethod
    def block_activation_bytes(config: LlamaConfig, precision: str, weights: str = "fp32") -> int:
        """Bytes one block keeps per token for the backward pass (`modelzoo.memory`).

        Activations of a = 2 bytes (bf16) or 4 (fp32), a fused SDPA kernel, a residual stream of r = 4 bytes (fp32
        `weights`) or 2 (bf16 `weights`: FSDP2's bf16 `param_dtype`). RMSNorm keeps its input upcast to fp32 (4h),
        rstd and the normalised input (r*h); rotary embeddings keep only their cos/sin tables (2 x head_dim values
        per position once per micro-batch, left out); K and V have n_kv_head heads, kv = n_kv_head x head_dim; the
        SwiGLU keeps gate, SiLU, up and product, a*f each; under bf16 autocast with fp32 weights each of the five
        projections fed by a norm casts its input separately (10h), otherwise the q/k/v and the gate/up
        projections share the norm's output (2*a*h):

            2 norms ((4 + r)h + 4) | q/k/v and gate/up inputs 10h or 2*a*h | rotated q a*h, k and v 2*a*kv,
            SDPA output a*h, log-sum-exp 4*n_head | SwiGLU 4*a*f

        Where SDPA has no grouped-query mode (torch 2.4), K and V are repeated to n_head heads before it, and it
        keeps those copies too: 2*a*(h - kv) more.
        """
        a, r = activation_bytes(precision), activation_bytes(weights)
        h, kv = config.n_embd, config.n_kv_head * config.head_dim
        inputs = 10 * h if precision == "bf16" and weights == "fp32" else 2 * a * h
        repeated = 0 if SDPA_HAS_GQA or kv == h else 2 * a * (h - kv)
        norms = 2 * ((4 + r) * h + 4)
        return norms + inputs + 2 * a * h + 2 * a * kv + repeated + 4 * config.n_head + 4 * a * config.n_inner

    @staticmethod
    def final_norm_bytes(config: LlamaConfig, weights: str = "fp32") -> int:
        """Bytes per token the final RMSNorm keeps: its input upcast to fp32, rstd and the normalised input (fp32,
        or bf16 under bf16 `weights`)."""
        return (4 + activation_bytes(weights)) * config.n_embd + 4

    def reset_parameters(self) -> None:
        """Truncated normal std `init_std`; residual output projections (o, down) scaled by 1/sqrt(2 n_layer)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std * scale, a=-2 * std * scale, b=2 * std * scale)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def hidden(
        self, idx: torch.Tensor, cache: KVCache | None = None, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-RMSNorm hidden states (B, P + T, C) of `idx` (B, T) behind `prefix` embeddings (B, P, C)."""
        x = self.model.embed_tokens(idx)  # (B, T, C)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + T, C)
        T = x.shape[1]
        start = 0 if cache is None else cache.length
        check_positions(self.config, cache, start, T)
        cos, sin = rotary_tables(self.config, torch.arange(start, start + T, device=idx.device), x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

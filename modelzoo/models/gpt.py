"""GPT decoder with Hugging Face GPT-2 architecture and parameter names.

Pre-LayerNorm blocks, learned absolute positions, GELU MLP, tied input/output embeddings and causal
scaled-dot-product attention: the network of `transformers.GPT2LMHeadModel`, which is also what
Cerebras' GPT-3 models convert to. Module names follow HF GPT-2 so export is a rename table; the
only layout difference is that HF stores the four projections as `Conv1D` (in, out) while we use
`nn.Linear` (out, in). An optional `KVCache` lets decoding feed one new token per step.

The module is plain PyTorch: it knows nothing of sparsity, configs files, devices or distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelzoo.models.common import DecoderLM, DecoderShape, KVCache, activation_bytes, causal_attention, check_positions


@dataclass
class GPTConfig(DecoderShape):
    """Shape of a GPT model. Sizes live in `conf/model/*.yaml`, each citing what it mirrors."""

    name: str = "tiny"
    family: str = "gpt"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 512
    n_positions: int = 128
    vocab_size: int = 4096
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    # The embedding and the tied head get `vocab_size` rounded up to a multiple of this many rows (64 keeps the
    # head's GEMM on whole tensor-core tiles: 50257 -> 50304). The extra rows are never a prediction: `forward`
    # drops their logits, so they take no probability mass in the loss or in sampling; exports drop the rows.
    padded_vocab_multiple: int = 1

    @property
    def n_kv_head(self) -> int:
        """Key/value heads: one per query head (GPT has no grouped-query attention)."""
        return self.n_head


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # index into a KVCache
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, past + T, hs)
        y = causal_attention(q, k, v, past, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(DecoderLM):
    """GPT language model; `forward` returns logits (B, T, vocab) and, given targets, the mean CE loss.

    With a `KVCache`, `idx` holds only the tokens after the cached positions (the whole prompt first, then
    one token per decoding step) and the cache is extended in place. The interface every family shares is
    `modelzoo.models.registry.CausalLM`.
    """

    # The tensors with one row per token id (and what a plug-in stores beside them under a longer name, such as a
    # sparsity mask `transformer.wte.weight_mask`); the embeddings `num_params(non_embedding=True)` leaves out.
    VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")
    EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"activation={config.activation!r}; allowed: {sorted(ACTIVATIONS)}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        self.reset_parameters()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    @property
    def embedding(self) -> nn.Embedding:
        return self.transformer.wte

    @staticmethod
    def block_activation_bytes(config: GPTConfig, precision: str, weights: str = "fp32") -> int:
        """Bytes one block keeps per token for the backward pass (`modelzoo.memory`).

        Activations of a = 2 bytes (bf16) or 4 (fp32), a fused SDPA kernel, dropout 0, and a residual stream of
        r = 4 bytes (`weights` fp32: autocast leaves it fp32) or 2 (`weights` bf16: FSDP2's bf16 `param_dtype`, so the
        embeddings' output and every LayerNorm's input, mean and rstd are bf16):

            ln_1 input r*h, mean and rstd 2r | c_attn input a*h | q, k, v 3*a*h | SDPA output a*h (also c_proj's
            input: the same storage), log-sum-exp 4*n_head | ln_2 input r*h, mean and rstd 2r | c_fc input a*h |
            GELU input a*f | mlp c_proj input a*f                    = (2r + 6a) h + 2 a f + 4r + 4 n_head
        """
        a, r = activation_bytes(precision), activation_bytes(weights)
        return (2 * r + 6 * a) * config.n_embd + 2 * a * config.n_inner + 4 * r + 4 * config.n_head

    @staticmethod
    def final_norm_bytes(config: GPTConfig, weights: str = "fp32") -> int:
        """Bytes per token the final LayerNorm keeps: its input, mean and rstd, in the `weights` dtype."""
        r = activation_bytes(weights)
        return r * config.n_embd + 2 * r

    def reset_parameters(self) -> None:
        """GPT-3 init: truncated normal std 0.02; residual output projections scaled by 1/sqrt(2 n_layer)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 1.0
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std * scale, a=-2 * std * scale, b=2 * std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def hidden(
        self, idx: torch.Tensor, cache: KVCache | None = None, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, P + T, C) of `idx` (B, T) behind `prefix` embeddings (B, P, C).

        A `prefix` (e.g. soft-prompt virtual tokens) takes positions 0..P-1 like tokens would, as PEFT's prompt
        tuning does with HF GPT-2; the returned states include those P positions.
        """
        x = self.transformer.wte(idx)  # (B, T, C)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + T, C)
        T = x.shape[1]
        start = 0 if cache is None else cache.length
        check_positions(self.config, cache, start, T)
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(x + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

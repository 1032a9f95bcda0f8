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


@dataclass
class GPTConfig:
    """Shape of a GPT model. Sizes live in `conf/model/*.yaml`, each citing what it mirrors."""

    name: str = "tiny"
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
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding and the LM head: `vocab_size` rounded up to `padded_vocab_multiple`."""
        return -(-self.vocab_size // self.padded_vocab_multiple) * self.padded_vocab_multiple


ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class KVCache:
    """Keys and values of the positions seen so far, preallocated for `max_len` positions and filled in place.

    `GPT.forward(idx, cache=cache)` reads `length` as the position of `idx[:, 0]`, stores the new keys and
    values of every layer behind the cached ones, and advances `length` by `idx.shape[1]`.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not 0 < max_len <= config.n_positions:
            raise ValueError(f"max_len={max_len} must be in [1, n_positions={config.n_positions}]")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nh, max_len, hs)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (B, nh, T, hs) behind the cached positions; return all of them, (B, nh, length + T, hs)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


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
        # Without past positions the plain causal mask applies; with them, query i sees keys 0..past + i
        # (no mask at all for a single new token).
        mask = None if past == 0 or T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=past == 0
        )  # (B, nh, T, hs)
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


class GPT(nn.Module):
    """GPT language model; `forward` returns logits (B, T, vocab) and, given targets, the mean CE loss.

    With a `KVCache`, `idx` holds only the tokens after the cached positions (the whole prompt first, then
    one token per decoding step) and the cache is extended in place.
    """

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
        if self.config.n_positions < start + T:
            raise ValueError(f"sequence length {start + T} exceeds model n_positions={self.config.n_positions}")
        if cache is not None and cache.max_len < start + T:
            raise ValueError(f"sequence length {start + T} exceeds the cache's max_len={cache.max_len}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(x + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, P + T, vocab) of `idx` (B, T) behind optional `prefix` embeddings (B, P, C).

        With `targets` (B, P + T; -100 where no loss is taken), also the mean cross-entropy loss.
        """
        logits = self.lm_head(self.hidden(idx, cache, prefix))  # (B, P + T, padded vocab)
        logits = logits[..., : self.config.vocab_size]  # (B, P + T, vocab): padded rows are never predicted
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; `non_embedding` excludes token and position embeddings (tied head counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n


# The tensors with one row per token id: the embedding, its tied head, and what a plug-in stores beside them
# under a longer name (a sparsity mask `transformer.wte.weight_mask`).
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")


def unpad_vocab(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """`state_dict` with the padded vocabulary rows (beyond `config.vocab_size`) cut off, for exports."""
    return {k: v[: config.vocab_size] if k.startswith(VOCAB_ROWS) else v for k, v in state_dict.items()}


def pad_vocab(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """`state_dict` of `config.vocab_size` rows with zero rows appended up to `config.padded_vocab_size`."""
    extra = config.padded_vocab_size - config.vocab_size
    return {
        k: torch.cat([v, v.new_zeros(extra, *v.shape[1:])]) if k.startswith(VOCAB_ROWS) else v
        for k, v in state_dict.items()
    }

"""What every model family shares: the KV cache, causal attention over it, position checks and the LM loss.

Plain PyTorch like the model files that use it; the config arguments are the shape fields every family's
config has (`n_layer`, `n_kv_head`, `head_dim`, `n_positions`, `vocab_size`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of the positions seen so far, preallocated for `max_len` positions and filled in place.

    `model.forward(idx, cache=cache)` reads `length` as the position of `idx[:, 0]`, stores the new keys and
    values of every layer behind the cached ones, and advances `length` by `idx.shape[1]`. It holds the
    `n_kv_head` key/value heads of each layer (fewer than the query heads under grouped-query attention).
    """

    def __init__(
        self,
        config: Any,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not 0 < max_len <= config.n_positions:
            raise ValueError(f"max_len={max_len} must be in [1, n_positions={config.n_positions}]")
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, n_kv, max_len, hs)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (B, n_kv, T, hs) behind the cached positions; return all, (B, n_kv, length + T, hs)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# `enable_gqa` arrived in torch 2.5; torch 2.4 (pinned by cerebras-pytorch) repeats key/value heads instead.
SDPA_HAS_GQA = torch.__version__ >= (2, 5)  # a TorchVersion: compares with tuples


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal SDPA of queries `q` (B, nh, T, hs) over keys/values (B, n_kv, past + T, hs): (B, nh, T, hs).

    Without past positions the plain causal mask applies; with them, query i sees keys 0..past + i (no mask at
    all for a single new token). Fewer key/value heads than query heads is grouped-query attention.
    """
    T = q.shape[2]
    mask = None if past == 0 or T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past)
    groups = {}
    if k.shape[1] != q.shape[1]:
        if SDPA_HAS_GQA:
            groups = {"enable_gqa": True}
        else:  # torch 2.4 (the Cerebras venv's): each key/value head repeated for its group of query heads
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=past == 0, **groups)


def check_positions(config: Any, cache: KVCache | None, start: int, T: int) -> None:
    """Refuse positions `start..start + T - 1` beyond the model's `n_positions` or the cache's `max_len`."""
    if config.n_positions < start + T:
        raise ValueError(f"sequence length {start + T} exceeds model n_positions={config.n_positions}")
    if cache is not None and cache.max_len < start + T:
        raise ValueError(f"sequence length {start + T} exceeds the cache's max_len={cache.max_len}")


def lm_output(
    logits: torch.Tensor, targets: torch.Tensor | None, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, T, padded vocab) cut to `vocab_size` (padded rows are never predicted) and, given `targets`
    (B, T; -100 where no loss is taken), the mean cross-entropy loss in fp32."""
    if logits.size(-1) != vocab_size:  # a padded vocabulary (no view otherwise: FSDP2 warns of views it returns)
        logits = logits[..., :vocab_size]
    if targets is None:
        return logits, None
    return logits, F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.view(-1))


def activation_bytes(precision: str) -> int:
    """Bytes of one activation value a step keeps under `precision`: 2 under bf16 autocast, else 4 (fp32)."""
    return 2 if precision == "bf16" else 4


class DecoderShape:
    """The sizes both families' configs derive from their fields (`n_embd`, `n_head`, `vocab_size`,
    `padded_vocab_multiple`): a mixin of `GPTConfig` and `LlamaConfig`."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding and the LM head: `vocab_size` rounded up to `padded_vocab_multiple`."""
        return -(-self.vocab_size // self.padded_vocab_multiple) * self.padded_vocab_multiple


class DecoderLM(nn.Module):
    """What a family's model shares: the cache it decodes with, logits and loss from its `hidden` states and
    `lm_head`, and its parameter count without the `EMBEDDINGS`."""

    EMBEDDINGS: tuple[str, ...] = ()
    config: Any
    lm_head: nn.Linear

    def hidden(
        self, idx: torch.Tensor, cache: KVCache | None = None, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty `KVCache` for `batch_size` sequences of up to `max_len` positions."""
        return KVCache(self.config, batch_size, max_len, device, dtype)

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
        return lm_output(self.lm_head(self.hidden(idx, cache, prefix)), targets, self.config.vocab_size)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied head counted once); `non_embedding` leaves out the `EMBEDDINGS`."""
        n = sum(p.numel() for p in self.parameters())
        return n - sum(self.get_parameter(name).numel() for name in self.EMBEDDINGS) if non_embedding else n

"""Batch-1 text generation: greedy or sampled (temperature, top-k, top-p) decoding with a KV cache.

`generate` runs the prompt once (prefill), then feeds one new token per step, reusing the keys and values
of earlier positions from a `KVCache`; `use_cache=False` recomputes the whole context every step instead
(same tokens, for checking). Greedy decoding picks the first arg-max, as `transformers`' `generate` does,
so both give the same tokens for the same weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from modelzoo.errors import ConfigError
from modelzoo.models.registry import CausalLM


@dataclass(frozen=True)
class Sampling:
    """`temperature` 0 is greedy; otherwise sample from the softmax after `top_k` (0: off) and `top_p` (1: off)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class Generation:
    """The new tokens (ending with EOS when decoding stopped there) and how long producing them took."""

    tokens: list[int]
    prompt_tokens: int
    prefill_s: float  # the prompt's forward pass, which also yields the first new token
    decode_s: float  # every later step

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, prefill included."""
        return len(self.tokens) / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the steps after the first (one forward pass each); 0 when there were none."""
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`logits` (vocab,) with every token outside the top `top_k` and the top-`top_p` mass set to -inf.

    Top-p keeps the most likely tokens up to and including the one whose cumulative probability reaches
    `top_p` (so always at least one), as `transformers`' `TopPLogitsWarper` does.
    """
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        logits = logits.masked_fill(
            torch.zeros_like(logits, dtype=torch.bool).scatter(0, order, before >= top_p), float("-inf")
        )
    return logits


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from the last position's `logits` (vocab,)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_token_id: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> Generation:
    """Decode up to `max_new_tokens` tokens after `prompt` (batch 1), stopping after `eos_token_id`.

    Raises:
        ConfigError: an empty prompt, or prompt plus new tokens longer than the model's `n_positions`.
    """
    n_positions = model.config.n_positions
    if not prompt:
        raise ConfigError("task.prompt", "is empty and the tokenizer has no BOS token to start from")
    if len(prompt) + max_new_tokens > n_positions:
        raise ConfigError(
            "task.max_new_tokens",
            f"{len(prompt)} prompt tokens + {max_new_tokens} new ones exceed the model's n_positions={n_positions}",
        )
    weight = next(model.parameters())
    generator = torch.Generator(weight.device).manual_seed(seed)
    cache = model.new_cache(1, len(prompt) + max_new_tokens, weight.device, weight.dtype) if use_cache else None
    ids = torch.tensor([prompt], device=weight.device)  # (1, T): the prompt, then what the next step feeds
    tokens: list[int] = []
    start = time.perf_counter()
    prefill_s = 0.0
    for step in range(max_new_tokens):
        logits, _ = model(ids, cache=cache)  # (1, T, vocab)
        tokens.append(next_token(logits[0, -1], sampling, generator))
        if step == 0:
            prefill_s = time.perf_counter() - start
        if tokens[-1] == eos_token_id:
            break
        new = torch.tensor([[tokens[-1]]], device=weight.device)
        ids = new if cache is not None else torch.cat([ids, new], dim=1)  # the cache holds everything before
    return Generation(tokens, len(prompt), prefill_s, time.perf_counter() - start - prefill_s)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of `prompt`; an empty prompt is the BOS token alone (none when the tokenizer has no BOS)."""
    if prompt:
        return tokenizer(prompt)["input_ids"]
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def format_speed(result: Generation) -> str:
    """One line: new tokens, time, tokens/s overall and of the decoding steps alone."""
    return (
        f"{len(result.tokens)} new tokens in {result.prefill_s + result.decode_s:.2f} s, {result.tokens_per_s:.1f} "
        f"tokens/s (prompt of {result.prompt_tokens} tokens: {result.prefill_s * 1e3:.0f} ms; "
        f"then {result.decode_tokens_per_s:.1f} tokens/s)"
    )

"""Token tensors for fine-tuning: causal-LM examples with the loss on the answer only, classification examples.

PubMedQA examples are encoded exactly as `modelzoo.downstream.scoring` (lm-evaluation-harness) scores them:
the continuation is `" yes"` (the answer behind lm-eval's one-space target delimiter) and when context and
answer exceed the budget the context is cut from the **left**. Batches are right-padded: with causal attention
the real tokens never see the padding, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from modelzoo.downstream.scoring import TARGET_DELIMITER, request_tokens

IGNORE = -100  # cross_entropy's ignore_index: positions that take no loss


@dataclass(frozen=True)
class LMExample:
    """Model input `ids` (T) and next-token `targets` (T): IGNORE except where an answer token is predicted."""

    ids: tuple[int, ...]
    targets: tuple[int, ...]


def encode_answer(tokenizer: PreTrainedTokenizerBase, context: str, answer: str, seq_len: int) -> LMExample:
    """`context` + " " + `answer` as lm-eval tokenises it; at most `seq_len` inputs, the context cut from the left."""
    ids, answer_ids = request_tokens(tokenizer, context, TARGET_DELIMITER + answer, seq_len)
    return LMExample(ids, (IGNORE,) * (len(ids) - len(answer_ids)) + answer_ids)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int) -> list[int]:
    """A classification input: the first `seq_len` tokens of `text`."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad rows of token ids to the longest: (B, T) int64."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def shuffled_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless index batches: a fresh seeded permutation each epoch, the last short batch of an epoch dropped
    unless the epoch is shorter than one batch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        stop = n - n % batch_size if n >= batch_size else n
        for start in range(0, stop, batch_size):
            yield order[start : start + batch_size]

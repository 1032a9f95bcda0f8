"""Token tensors for fine-tuning: causal-LM examples with the loss on the answer only, classification examples.

PubMedQA examples are encoded as lm-evaluation-harness scores them: context and continuation (`" yes"`, the
answer behind lm-eval's one-space target delimiter) are tokenised separately, and when both exceed the budget
the context is cut from the **left**. Batches are right-padded: with causal attention the real tokens never
see the padding, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100  # cross_entropy's ignore_index: positions that take no loss
TARGET_DELIMITER = " "  # lm-eval's default between the prompt and a choice


@dataclass(frozen=True)
class LMExample:
    """Model input `ids` (T) and next-token `targets` (T): IGNORE except where an answer token is predicted."""

    ids: list[int]
    targets: list[int]


def encode_answer(tokenizer: PreTrainedTokenizerBase, context: str, answer: str, seq_len: int) -> LMExample:
    """`context` + delimiter + `answer` as one example of at most `seq_len` inputs (context cut from the left)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    ans = tokenizer(TARGET_DELIMITER + answer, add_special_tokens=False)["input_ids"]
    tokens = (ctx + ans)[-(seq_len + 1) :]  # lm-eval keeps the last max_length + 1 tokens
    n_ctx = len(tokens) - len(ans)
    targets = [IGNORE] * (n_ctx - 1) + tokens[n_ctx:]
    return LMExample(tokens[:-1], targets)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int) -> list[int]:
    """A classification input: the first `seq_len` tokens of `text`."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad rows of token ids to the longest: (B, T) int64."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def multi_hot(labels: Sequence[frozenset[int]], num_labels: int) -> torch.Tensor:
    """(B, num_labels) float 0/1 targets of label sets."""
    out = torch.zeros(len(labels), num_labels)
    for i, row in enumerate(labels):
        out[i, list(row)] = 1.0
    return out


def shuffled_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless index batches: a fresh seeded permutation each epoch, the last short batch of an epoch dropped
    unless the epoch is shorter than one batch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        stop = n - n % batch_size if n >= batch_size else n
        for start in range(0, stop, batch_size):
            yield order[start : start + batch_size]


def chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))

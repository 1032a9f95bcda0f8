"""Token tensors for fine-tuning: causal-LM examples with the loss on the answer only, classification examples.

PubMedQA examples are encoded exactly as `modelzoo.downstream.scoring` (lm-evaluation-harness) scores them:
the continuation is `" yes"` (the answer behind lm-eval's one-space target delimiter) and when context and
answer exceed the budget the context is cut from the **left**. Batches are right-padded: with causal attention
the real tokens never see the padding, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from modelzoo.downstream.scoring import TARGET_DELIMITER, request_tokens
from modelzoo.errors import ConfigError

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


class ExampleBatches:
    """Step batches of fine-tuning examples for the shared loop, the same global batches under any world size.

    Every step takes the next `batch_size` examples of the epoch's seeded permutation (`torch.randperm` with seed
    `seed + epoch`; an epoch's last short batch is dropped); they split into micro-batches of `micro_batch_size`,
    of which rank `r` takes its consecutive share. Each item is (inputs, targets) stacked as
    (micro-batches, micro_batch_size, ...), right-padded to the rank's longest example. `tokens` counts the input
    tokens of every rank's examples (what FLOPs are charged for). Resumable: `state_dict` is the position.
    """

    def __init__(
        self,
        example: Callable[[int], tuple[Sequence[int], torch.Tensor]],
        size: int,
        pad_values: tuple[int, float],
        batch_size: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if size < batch_size:
            raise ConfigError("task.batch_size", f"{batch_size} exceeds the {size} training examples (task.limit?)")
        self.example, self.size, self.pad_values = example, size, pad_values
        self.batch_size, self.micro_batch_size, self.seed = batch_size, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.position = self.tokens = 0

    def _next_indices(self) -> list[int]:
        if self.position + self.batch_size > self.size:
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        indices = order[self.position : self.position + self.batch_size].tolist()
        self.position += self.batch_size
        return indices

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_rank = self.batch_size // self.world_size
        while True:
            examples = [self.example(i) for i in self._next_indices()]
            self.tokens += sum(len(ids) for ids, _ in examples)
            mine = examples[self.rank * per_rank : (self.rank + 1) * per_rank]
            inputs = pad([ids for ids, _ in mine], self.pad_values[0])
            targets = torch.nn.utils.rnn.pad_sequence([t for _, t in mine], True, self.pad_values[1])
            shape = (per_rank // self.micro_batch_size, self.micro_batch_size)
            yield inputs.view(*shape, -1), targets.view(*shape, *targets.shape[1:])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.tokens = state["epoch"], state["position"], state["tokens"]

"""Multiple-choice scoring by log-likelihood, computed as lm-evaluation-harness computes `loglikelihood`.

For each (context, choice) request lm-eval (`HFLM`, 0.4.x) scores the continuation `target_delimiter + choice`
(delimiter " ") after the context:
1. trailing whitespace of the context moves to the front of the continuation;
2. context and continuation are encoded together and the context alone (with the tokenizer's default special
   tokens, as lm-eval 0.4.13's `tok_encode`; GPT-2-style tokenizers add none); the continuation's tokens are
   the whole encoding after the context's tokens;
3. the model input is `(context + continuation tokens)[-(max_length + 1):][:-1]` (left-truncated to the model's
   window), and the score is the sum of the log-softmax at the continuation's positions.
An empty context starts from the BOS (else EOS) token. Requests with the same input (e.g. every one-token choice of one
context) share one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, T) ids, (B, T) mask -> (B, T, V) logits
TARGET_DELIMITER = " "


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token an empty context starts from: BOS, else EOS (lm-eval's `prefix_token_id`)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """lm-eval's `tok_encode`: the tokenizer's own special tokens, unless `text` already starts with the prefix."""
    prefix = tokenizer.decode(prefix_token_id(tokenizer))
    return tokenizer(text, add_special_tokens=not (prefix and text.startswith(prefix)))["input_ids"]


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-eval's `loglikelihood` / `_encode_pair` split them."""
    if not context:
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        prefix = prefix_token_id(tokenizer)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def request_tokens(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, max_length: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(model input, continuation tokens) of one request; the input ends one token before the continuation does."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    if not continuation_ids:
        raise ValueError(f"choice {continuation!r} encodes to no tokens after the context")
    tokens = context_ids + continuation_ids
    if max_length is not None:
        tokens = tokens[-(max_length + 1) :]
    return tuple(tokens[:-1]), tuple(continuation_ids)


@torch.inference_mode()
def choice_loglikelihoods(
    logits_fn: LogitsFn,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    choices: Sequence[str],
    batch_size: int = 8,
    progress: bool = True,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(len(contexts), len(choices)) float64 sums of log p(" " + choice | context), as lm-eval's `loglikelihood`.

    Args:
        logits_fn: maps input ids and attention mask, both (B, T) on `device`, to logits (B, T, V); batches are
            right-padded, so a causal model's logits at real positions do not depend on the padding.
        tokenizer: the model's tokenizer.
        contexts: prompts, e.g. `pubmedqa_prompt(example)`.
        choices: answers, scored with a leading space (lm-eval's default target delimiter).
        batch_size: forward passes per call of `logits_fn`.
        progress: show a tqdm bar over the forward passes.
        max_length: the model's context window (lm-eval: `n_positions`); longer inputs lose their oldest tokens.
            A soft-prompted model that prepends N virtual tokens inside `logits_fn` has `n_positions - N` left.
        device: where input tensors are put.
    """
    requests = [
        request_tokens(tokenizer, context, TARGET_DELIMITER + choice, max_length)
        for context in contexts
        for choice in choices
    ]
    needed: dict[tuple[int, ...], int] = {}  # per distinct input: how many final positions any request scores
    for inp, continuation in requests:
        needed[inp] = max(needed.get(inp, 0), len(continuation))
    inputs = sorted(needed, key=len, reverse=True)  # longest first: least padding
    log_probs: dict[tuple[int, ...], torch.Tensor] = {}  # input -> (needed, V) log-probs of its last positions
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = range(0, len(inputs), batch_size)
    for start in tqdm(batches, desc="log-likelihoods", unit="batch", disable=not progress):
        batch = inputs[start : start + batch_size]
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, inp in enumerate(batch):
            ids[row, : len(inp)] = torch.tensor(inp)
            mask[row, : len(inp)] = 1
        logits = logits_fn(ids.to(device), mask.to(device))
        for row, inp in enumerate(batch):
            log_probs[inp] = logits[row, len(inp) - needed[inp] : len(inp)].float().log_softmax(-1).cpu()
    scores = torch.empty(len(requests), dtype=torch.float64)
    for i, (inp, continuation) in enumerate(requests):
        tail = log_probs[inp][-len(continuation) :]  # positions that predict the continuation's tokens
        scores[i] = tail.gather(1, torch.tensor(continuation).unsqueeze(1)).sum().double()
    return scores.view(len(contexts), len(choices))

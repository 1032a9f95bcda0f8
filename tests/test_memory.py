"""The memory plan of `modelzoo info`: its activation counts equal what autograd keeps on CPU, to the byte."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from modelzoo.config import load_config, to_object
from modelzoo.memory import GIB, block_activation_bytes, format_memory_plan, memory_plan
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.models.llama import Llama, LlamaConfig
from modelzoo.models.registry import CausalLM
from modelzoo.train.accel import checkpoint_blocks

CONFIG = GPTConfig(
    name="t", n_layer=3, n_embd=128, n_head=4, n_inner=512, n_positions=128, vocab_size=1000, padded_vocab_multiple=64
)


def kept_bytes(model: CausalLM, precision: str, batch: int, seq: int) -> int:
    """Bytes of the tensors autograd saves in one training forward (parameters excluded: the plan counts them as
    weights) plus the logits the step holds until its backward; one storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x, y = torch.randint(0, model.config.vocab_size, (2, batch, seq))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        logits, _ = model(x, y)
    kept[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    return sum(kept.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activation_counts_equal_what_autograd_keeps(precision: str, checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = GPT(CONFIG).train()
    if checkpointing:
        checkpoint_blocks(model)
    batch, seq = 4, 128
    plan = memory_plan(CONFIG, None, precision, batch, seq)
    expected = plan.activations_checkpointed if checkpointing else plan.activations
    if checkpointing:  # the block the backward pass recomputes is not held during the forward
        expected -= block_activation_bytes(CONFIG, precision) * batch * seq
    if checkpointing and precision == "bf16":  # the blocks' bf16 weight copies sit in autocast's cache, not autograd's
        expected -= 2 * sum(
            p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("transformer.h.")
        )
    # Left out of the plan: the position ids (int64, one row for the batch) and a 4-byte scalar of the loss.
    assert kept_bytes(model, precision, batch, seq) == expected + 8 * seq + 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_llama_activation_counts_equal_what_autograd_keeps(precision: str) -> None:
    config = LlamaConfig(
        name="t", n_layer=3, n_embd=128, n_head=4, n_kv_head=2, n_inner=352, n_positions=128, vocab_size=1000,
        padded_vocab_multiple=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llama(config).train()
    batch, seq = 4, 128
    expected = memory_plan(config, None, precision, batch, seq).activations
    # Left out of the plan: the fp32 rotary cos/sin tables (one row per position) and a 4-byte scalar of the loss.
    assert kept_bytes(model, precision, batch, seq) == expected + 2 * 4 * config.head_dim * seq + 4


def test_xl_plan_itemises_state_and_checkpointing_saves_activations() -> None:
    cfg = to_object(load_config(["model=xl", "task.micro_batch_size=8", "data.seq_len=2048", "task.precision=bf16"]))
    plan = memory_plan(cfg.model, cfg.sparsity, "bf16", 8, 2048)
    items = dict(plan.items)
    n = 1_315_819_520  # xl with the vocabulary padded to 50304 rows: 1,208.0M block matrices + norms + embeddings
    assert items["weights (fp32)"] == 4 * n
    assert items["AdamW moments (2 x fp32)"] == 8 * n
    assert plan.activations_checkpointed < plan.activations / 2
    text = format_memory_plan(plan)
    assert "activation_checkpointing" in text and f"{plan.total / GIB:.2f} GiB" in text

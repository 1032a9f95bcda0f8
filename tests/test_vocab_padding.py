"""Vocabulary padding: the padded rows run in the head's GEMM but never get probability mass, and exports drop them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from modelzoo.config import load_config, to_object
from modelzoo.export.hf import export_hf, load_hf
from modelzoo.flops import flop_report
from modelzoo.generate import generate
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity

UNPADDED = GPTConfig(name="test", n_layer=2, n_embd=64, n_head=4, n_inner=256, n_positions=64, vocab_size=300)
PADDED = replace(UNPADDED, padded_vocab_multiple=64)  # 300 -> 320 rows


def padded_pair(sparse: bool = False) -> tuple[GPT, GPT]:
    """(padded, unpadded) models with the same weights; the padded rows are set far above every real row, so
    any probability mass they got would dominate the softmax."""
    torch.manual_seed(0)
    padded = GPT(PADDED).eval()
    if sparse:
        MaskedSparsity(SparsityConfig(sparsity=0.75, param_filter=["*"]), seed=0).apply(padded)
    with torch.no_grad():
        padded.transformer.wte.weight[UNPADDED.vocab_size :] = 3.0
    unpadded = GPT(UNPADDED).eval()
    state = {k: v[: UNPADDED.vocab_size] if "wte" in k or "lm_head" in k else v for k, v in padded.state_dict().items()}
    unpadded.load_state_dict({k: v for k, v in state.items() if not k.endswith("_mask")})
    return padded, unpadded


def test_gpt3_sizes_pad_to_a_multiple_of_64_and_tiny_is_already_one() -> None:
    for size in ("med", "large", "xl"):
        model = to_object(load_config([f"model={size}"])).model
        assert (model.vocab_size, model.padded_vocab_size) == (50257, 50304)
    tiny = to_object(load_config([])).model
    assert tiny.padded_vocab_size == tiny.vocab_size == 4096


def test_padded_rows_get_no_probability_mass_in_logits_loss_or_generation() -> None:
    padded, unpadded = padded_pair()
    assert padded.transformer.wte.weight.shape[0] == padded.lm_head.weight.shape[0] == 320
    x = torch.randint(0, UNPADDED.vocab_size, (2, 16))
    logits, loss = padded(x, x)
    ref_logits, ref_loss = unpadded(x, x)
    assert logits.shape[-1] == UNPADDED.vocab_size
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert generate(padded, [1, 2, 3], 8).tokens == generate(unpadded, [1, 2, 3], 8).tokens


def test_export_drops_padded_rows_and_transformers_computes_the_same_logits(tmp_path: Path) -> None:
    padded, _ = padded_pair(sparse=True)  # the embedding's mask is cut with it
    directory = export_hf(padded, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert hf.get_input_embeddings().weight.shape[0] == UNPADDED.vocab_size
    x = torch.randint(0, UNPADDED.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, padded(x)[0], rtol=1e-5, atol=1e-5)
        reloaded = load_hf(directory, padded_vocab_multiple=64).eval()
        assert reloaded.transformer.wte.weight.shape[0] == 320
        torch.testing.assert_close(reloaded(x)[0], padded(x)[0], rtol=1e-6, atol=1e-6)


def test_flops_count_the_padded_head_that_runs() -> None:
    """FlopCounterMode's count of a padded model's forward+backward equals 3x the formula's forward."""
    torch.manual_seed(0)
    model = GPT(PADDED)
    x = torch.randint(0, PADDED.vocab_size, (2, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    report = flop_report(PADDED, 32, None)
    assert counter.get_total_flops() == pytest.approx(report.dense_per_token * 2 * 32, rel=1e-9)
    assert report.dense_per_token > flop_report(UNPADDED, 32, None).dense_per_token

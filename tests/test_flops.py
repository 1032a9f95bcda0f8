"""FLOP accounting: the papers' ratios, and the formula against a direct count of the executed matmuls."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modelzoo.config import load_config, to_object
from modelzoo.flops import flop_report
from modelzoo.models.gpt import GPT
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity


@pytest.mark.parametrize(
    ("size", "sparsity", "expected"),
    [("xl", "static_50", 1.67), ("xl", "static_75", 2.5), ("med", "static_75", 2.0)],
)
def test_reproduces_paper_ratios(size: str, sparsity: str, expected: float) -> None:
    cfg = to_object(load_config([f"model={size}", f"sparsity={sparsity}"]))
    assert cfg.data.seq_len == 2048  # the papers' context
    report = flop_report(cfg.model, cfg.data.seq_len, cfg.sparsity)
    assert report.reduction == pytest.approx(expected, abs=0.01)


def test_dense_matches_direct_count(tiny_model: GPT) -> None:
    """Forward + backward FLOPs counted by torch's FlopCounterMode equal 3x our forward formula.

    The math SDPA kernel runs attention as counted bmm ops (the fused CPU kernel is not counted).
    """
    batch, seq_len = 2, 32
    x = torch.randint(0, tiny_model.config.vocab_size, (batch, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = tiny_model(x, x)
        loss.backward()
    report = flop_report(tiny_model.config, seq_len, None)
    assert counter.get_total_flops() == pytest.approx(report.dense_per_token * batch * seq_len, rel=1e-9)


def test_sparse_matches_direct_count_of_nonzeros(tiny_model: GPT) -> None:
    """Sparse-effective FLOPs equal the dense count with every masked matmul charged for its nonzeros only."""
    sparsity = SparsityConfig(sparsity=0.75)
    plugin = MaskedSparsity(sparsity, seed=0)
    plugin.apply(tiny_model)
    seq_len, tokens = 32, 1
    report = flop_report(tiny_model.config, seq_len, sparsity)
    params = dict(tiny_model.named_parameters())
    saved = sum(
        2 * 3 * (params[sp.name].numel() - int(sp.mask.sum())) * tokens for sp in plugin.params
    )  # train = 3x forward
    assert report.sparse_per_token == pytest.approx(report.dense_per_token - saved, rel=1e-12)


def test_embedding_and_attention_scores_stay_dense(tiny_model: GPT) -> None:
    report = flop_report(tiny_model.config, 64, SparsityConfig(sparsity=0.9))
    terms = {t.name: t for t in report.terms}
    assert terms["attention scores"].sparse == terms["attention scores"].dense > 0
    assert terms["lm head"].sparse == terms["lm head"].dense > 0
    assert terms["mlp in"].sparse == pytest.approx(0.1 * terms["mlp in"].dense)

"""FLOP accounting: the papers' ratios, and the formula against a direct count of the executed matmuls."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modelzoo.config import load_config, to_object
from modelzoo.flops import TRAIN_MULTIPLIER, flop_report
from modelzoo.models.gpt import GPT
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity
from tests.conftest import GMP_75_AVERAGE


@pytest.mark.parametrize("steps", [None, 400])
@pytest.mark.parametrize(
    ("size", "sparsity", "expected"),
    [("xl", "static_50", 1.67), ("xl", "static_75", 2.5), ("med", "static_75", 2.0)],
)
def test_reproduces_paper_ratios(size: str, sparsity: str, expected: float, steps: int | None) -> None:
    cfg = to_object(load_config([f"model={size}", f"sparsity={sparsity}"]))
    assert cfg.data.seq_len == 2048  # the papers' context
    report = flop_report(cfg.model, cfg.data.seq_len, cfg.sparsity, steps=steps)
    assert report.reduction == pytest.approx(expected, abs=0.01)
    assert not report.varies and report.average_sparsity == report.final_sparsity


def xl_report(sparsity: str, steps: int = 400):
    cfg = to_object(load_config(["model=xl", f"sparsity={sparsity}"]))
    return flop_report(cfg.model, cfg.data.seq_len, cfg.sparsity, steps=steps)


def sparse_weight_flops(report) -> float:
    """Forward FLOPs per token of the weights the default filter makes sparse (attention and MLP matrices)."""
    return sum(t.dense for t in report.terms if t.name.startswith(("attention q", "attention o", "mlp")))


def test_gmp_is_charged_along_its_schedule() -> None:
    """gmp_75 starts dense and reaches 75% at step 300 of 400: each step is charged at its own level."""
    report = xl_report("gmp_75")
    assert report.average_sparsity == pytest.approx(GMP_75_AVERAGE, rel=1e-6) and report.final_sparsity == 0.75
    saved = TRAIN_MULTIPLIER * sparse_weight_flops(report) * GMP_75_AVERAGE
    assert report.sparse_per_token == pytest.approx(report.dense_per_token - saved, rel=1e-7)  # float32 levels
    assert report.reduction == pytest.approx(1.58, abs=0.005) and report.final_reduction == pytest.approx(
        2.49, abs=0.005
    )
    assert xl_report("gmp_75", steps=150).final_sparsity == pytest.approx(0.375, abs=1e-6)  # cut at half the cosine


def test_rigl_pays_for_the_dense_gradient_before_each_update() -> None:
    """rigl_75 updates at steps 10, 20, ..., 290: the 29 steps before them compute the dense weight gradient, so
    the weight-gradient third of their FLOPs is charged dense instead of at 25%."""
    report = xl_report("rigl_75")
    extra = 29 / 400 * 0.75 * sparse_weight_flops(report)
    assert report.sparse_per_token == pytest.approx(report.final_per_token + extra, rel=1e-9)
    assert report.average_sparsity == report.final_sparsity == 0.75 and report.varies


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

"""The GPT family: the size table's parameter counts and the GPT-3 initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from modelzoo.config import load_config, to_object
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.report import parameter_counts


@pytest.mark.parametrize(("size", "millions"), [("med", 302.0), ("large", 679.5), ("xl", 1208.0)])
def test_size_table_matches_papers(size: str, millions: float) -> None:
    cfg = to_object(load_config([f"model={size}"]))
    assert round(parameter_counts(cfg.model)["block matrices"] / 1e6, 1) == millions
    assert parameter_counts(cfg.model)["block matrices"] == 12 * cfg.model.n_layer * cfg.model.n_embd**2


def test_init_std_and_scaled_output_projections() -> None:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_embd=256, n_head=4, n_inner=1024, vocab_size=512)
    model = GPT(config)
    fc = model.transformer.h[0].mlp.c_fc.weight
    proj = model.transformer.h[0].mlp.c_proj.weight
    # a normal truncated at 2 sigma has std 0.8796 sigma
    assert fc.std().item() == pytest.approx(0.02 * 0.8796, rel=0.03)
    assert proj.std().item() == pytest.approx(0.02 * 0.8796 / math.sqrt(2 * config.n_layer), rel=0.03)
    assert fc.abs().max().item() <= 0.04
    assert model.lm_head.weight is model.transformer.wte.weight


def test_forward_shapes_and_loss(tiny_model: GPT) -> None:
    x, y = torch.randint(0, tiny_model.config.vocab_size, (2, 3, 16))
    logits, loss = tiny_model(x, y)
    assert logits.shape == (3, 16, tiny_model.config.vocab_size)
    assert loss.item() == pytest.approx(math.log(tiny_model.config.vocab_size), rel=0.05)  # near-uniform at init


def test_refuses_sequence_longer_than_positions(tiny_model: GPT) -> None:
    with pytest.raises(ValueError, match="n_positions"):
        tiny_model(torch.zeros(1, tiny_model.config.n_positions + 1, dtype=torch.long))

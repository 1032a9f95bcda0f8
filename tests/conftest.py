"""Shared fixtures. `../shared/data` tests skip only when ../shared is absent (CI fails on that itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelzoo.models.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(name="test", n_layer=2, n_embd=64, n_head=4, n_inner=256, n_positions=64, vocab_size=300)


@pytest.fixture
def tiny_model(tiny_config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config)

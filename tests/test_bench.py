"""The benchmark harness: a training-step measurement on a tiny shape, interleaving, and the docs section writer.

The smoke tests that time real runs of the benchmarks are marked `bench` and run in their own CI stage
(`pytest -m bench`); the harness's pure helpers stay in the default suite.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest
import torch

from modelzoo.models.gpt import GPTConfig

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their sibling `common` as scripts do
    return importlib.import_module("common")


@pytest.fixture
def train_step(common: ModuleType) -> ModuleType:
    return importlib.import_module("train_step")


@pytest.fixture
def sparse_gemm(common: ModuleType) -> ModuleType:
    return importlib.import_module("sparse_gemm")


@pytest.fixture
def decode(common: ModuleType) -> ModuleType:
    return importlib.import_module("decode")


@pytest.mark.bench
def test_train_step_measures_every_variant(train_step: ModuleType, tiny_config: GPTConfig) -> None:
    shape = train_step.Shape(tiny_config, batch=2, seq=8, steps=1)
    timings = train_step.measure(shape, steps=1, warmup=0, repeats=1)
    assert set(timings) == set(train_step.VARIANTS)
    assert all(shape.tokens / t.median > 0 and len(t.samples) == 1 for t in timings.values())
    text = train_step.report("test", shape, timings, steps=1)
    assert "ours / HF tokens/s" in text and "overhead" in text


@pytest.mark.bench
def test_sparse_gemm_measures_every_kernel(sparse_gemm: ModuleType) -> None:
    case = sparse_gemm.Case("med", "c_fc", out_features=128, in_features=64, tokens=2)
    timings = sparse_gemm.measure(case, [0.5, 0.75], repeats=1, stream_bytes=3 * 128 * 64 * 4)  # 3 copies
    assert set(timings) == {*sparse_gemm.DENSE, "csr 0.5", "bsr 0.5", "csr 0.75", "bsr 0.75"}
    text = sparse_gemm.report("med", 2, {case: timings}, [0.5, 0.75])
    assert "CSR 75% (limit 4.0x)" in text and "c_fc (128 x 64)" in text
    assert "CSR at 75%, M = 2" in sparse_gemm.summary({case: timings}, 0.75, 2)
    mask = sparse_gemm.random_mask((128, 64), 0.75, torch.Generator().manual_seed(0), block=32)
    assert mask.sum() == 128 * 64 // 4 and mask.view(4, 32, 2, 32).any(dim=(1, 3)).sum() == 2


@pytest.mark.bench
def test_decode_measures_every_variant_and_part(decode: ModuleType, tiny_config: GPTConfig) -> None:
    models, kernels = decode.build_models(tiny_config, 0.75, seed=0)
    assert set(models) == {"dense", "masked-dense", "torch_sparse", "dense, x @ Wt"} and "masked layers" in kernels
    timings, parts, tokens = decode.measure(models, [1, 2, 3], new_tokens=4, repeats=1)
    assert set(timings) == set(parts) == set(tokens) == set(models)
    assert set(parts["torch_sparse"]) == {
        "block matrices",
        "attention core (SDPA, KV cache)",
        "GELU",
        "LayerNorm",
        "LM head (dense)",
        "rest",
    }
    assert all(parts["dense"][p] > 0 for p in ("block matrices", "LM head (dense)", "LayerNorm"))
    assert tokens["masked-dense"] == tokens["torch_sparse"] and tokens["dense"] == tokens["dense, x @ Wt"]
    args = decode.parse_args(["--new-tokens", "4", "--prompt-tokens", "3"])
    args.kernels = kernels
    assert "torch_sparse vs dense end to end" in decode.report(tiny_config, timings, parts, args)


def test_parse_args_rejects_unknown_model(train_step: ModuleType) -> None:
    assert train_step.parse_args(["--models", "tiny"]).models == ["tiny"]
    with pytest.raises(SystemExit):
        train_step.parse_args(["--models", "tiny,huge"])


def test_time_interleaved_alternates_variants(common: ModuleType) -> None:
    calls: list[str] = []
    timings = common.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=2, number=2
    )
    assert calls == ["a", "b", *(["a", "a", "b", "b"] * 2)]
    assert all(len(t.samples) == 2 for t in timings.values())


def test_write_section_replaces_only_its_own_section(common: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "docs" / "benchmarks.md"
    common.write_section("Mine", "first", path)
    assert path.read_text().startswith(common.INTRO) and "## Mine\n\nfirst\n" in path.read_text()

    other = "## Other\n\n```\n## a fenced line, not a heading\n```\n\n| a |\n"
    path.write_text(path.read_text() + "\n" + other)
    common.write_section("Mine", "second\n\n### sub", path)
    common.write_section("Mine", "second\n\n### sub", path)  # idempotent
    text = path.read_text()
    assert "first" not in text and text.count("## Mine") == 1 and "## Mine\n\nsecond\n\n### sub\n\n## Other" in text
    assert text.endswith(other)

    common.write_section("Other", "replaced", path)
    text = path.read_text()
    assert "fenced" not in text and text.endswith("## Other\n\nreplaced\n") and "second" in text

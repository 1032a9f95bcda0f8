"""The benchmark harness: a training-step measurement on a tiny shape, interleaving, and the docs section writer.

The smoke tests that time real runs of the benchmarks are marked `bench` and run in their own CI stage
(`pytest -m bench`); the harness's pure helpers stay in the default suite.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from modelzoo.config import load_config, to_object
from modelzoo.memory import GIB, memory_plan
from modelzoo.models.gpt import GPTConfig
from modelzoo.train.loop import SPEED_COLUMNS
from modelzoo.train.metrics import COLUMNS, MetricsLogger

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


@pytest.fixture
def gpu(common: ModuleType) -> ModuleType:
    return importlib.import_module("gpu")


@pytest.mark.bench
def test_train_step_measures_every_variant(train_step: ModuleType, tiny_config: GPTConfig) -> None:
    shape = train_step.Shape(tiny_config, batch=2, seq=8, steps=1)
    timings = train_step.measure(shape, steps=1, warmup=0, repeats=1)
    assert set(timings) == set(train_step.VARIANTS)
    assert all(shape.tokens / t.median > 0 and len(t.samples) == 1 for t in timings.values())
    text = train_step.report("test", shape, timings, steps=1)
    assert "ours / HF GPT2LMHeadModel tokens/s" in text and "RigL step-time overhead" in text


@pytest.mark.bench
def test_train_step_times_a_llama_against_llama_for_causal_lm(train_step: ModuleType) -> None:
    config = train_step.model_size("llama_tiny", n_layer=1, n_embd=32, n_head=4, n_kv_head=2, n_inner=64)
    shape = train_step.Shape(config, batch=2, seq=8, steps=1, variants=train_step.BASE_VARIANTS)
    timings = train_step.measure(shape, steps=1, warmup=0, repeats=1)
    assert set(timings) == {"hf", "ours", "ours_masked75"}
    text = train_step.report("test", shape, timings, steps=1)
    assert "HF LlamaForCausalLM (sdpa), dense" in text and "n_kv_head 2" in text
    assert "masked-dense 75% step-time overhead" in text and "RigL" not in text


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


def test_gpu_bench_runs_every_eager_variant_and_reports(gpu: ModuleType, tiny_config: GPTConfig) -> None:
    """bench/gpu.py's eager variants on a tiny shape (the compiled ones are the `bench` test below)."""
    shape = gpu.Shape(tiny_config, batch=2, seq=8, steps=1)
    args = gpu.parse_args(["--device", "cpu", "--steps", "1", "--repeats", "2", "--warmup", "0"])
    cpu = torch.device("cpu")
    results = {(v, c): gpu.measure_variant(v, shape, cpu, "fp32", c, args) for v, c in gpu.variants("gpt") if not c}
    assert all(len(r.timing.samples) == 2 and r.timing.median > 0 for r in results.values())
    assert results.keys() == {
        ("hf", False),
        ("dense", False),
        ("static75", False),
        ("rigl75", False),
        ("rigl75_update", False),
    }
    assert results["hf", False].flops_per_token == results["dense", False].flops_per_token  # unpadded: one network
    text = gpu.report("test", shape, results, None, 1)
    assert "ours, masked-dense static 75%" in text and "| n/a |" in text and "compiled / eager" not in text
    assert gpu.estimate_seconds([shape], cpu, "fp32", args) > 0


def test_gpu_bench_times_llama_against_hf_llama(gpu: ModuleType) -> None:
    """The Llama rows: ours dense and masked-dense static 75% against HF `LlamaForCausalLM` of the same shape."""
    shape = gpu.Shape(gpu.SHAPES["llama_tiny"].model, batch=2, seq=8, steps=1)
    args = gpu.parse_args(
        ["--device", "cpu", "--model", "llama_tiny", "--steps", "1", "--repeats", "1", "--warmup", "0"]
    )
    cpu = torch.device("cpu")
    eager = [(v, c) for v, c in gpu.variants("llama") if not c]
    assert eager == [("hf", False), ("dense", False), ("static75", False)]
    results = {(v, c): gpu.measure_variant(v, shape, cpu, "fp32", c, args) for v, c in eager}
    assert results["hf", False].flops_per_token == results["dense", False].flops_per_token  # vocab 4096: unpadded
    text = gpu.report("llama_tiny", shape, results, None, 1)
    assert "HF LlamaForCausalLM (sdpa), dense" in text and "ours dense / HF tokens/s" in text and "RigL" not in text
    assert "GPT2" not in text and gpu.estimate_seconds([shape], cpu, "fp32", args) > 0


def test_fsdp_bench_runs_the_trainer_under_torchrun_and_reads_its_metrics(common: ModuleType, tmp_path: Path) -> None:
    """bench/fsdp.py's parts without a run: the torchrun command is `modelzoo pretrain task.parallelism=fsdp`, its
    overrides compose into a valid config whose FSDP plan is the one reported, and a metrics.csv the trainer's logger
    writes reads back without its warm-up steps."""
    fsdp = importlib.import_module("fsdp")
    shape = common.Shape(common.model_size("llama_tiny"), batch=2, seq=64, steps=1)
    run_overrides = fsdp.overrides("llama_tiny", "static_75", shape, torch.device("cpu"), "fp32", 2, 4, tmp_path)
    cmd = fsdp.command(2, run_overrides)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert cmd[6:8] == ["modelzoo", "pretrain"] and "task.parallelism=fsdp" in cmd and "task.batch_size=4" in cmd
    cfg = to_object(load_config(run_overrides))
    plan = memory_plan(cfg.model, cfg.sparsity, "fp32", 2, 64, fsdp_gpus=2)
    assert fsdp.planned_gib(run_overrides, 2) == plan.total / GIB and cfg.sparsity.sparsity == 0.75

    logger = MetricsLogger(tmp_path / "static_75", columns=(*COLUMNS, *SPEED_COLUMNS))
    for step, tps, mem in ((1, 10.0, 9.0), (2, 20.0, 8.0), (3, 30.0, 2.0), (4, 50.0, 3.0)):
        logger.log(step, tokens_per_s=tps, peak_mem_gib=mem, mfu=tps / 100)
    assert fsdp.read_metrics(tmp_path / "static_75") == (40.0, 0.4, 3.0)  # steps 3 and 4 only
    result = fsdp.RunResult(40.0, 0.4, 3.0, 2.5)
    text = fsdp.report("llama_tiny", shape, 2, 4, {"dense": fsdp.RunResult(50.0, None, None, 2.4), "static_75": result})
    assert "| static_75 | 40 | 40.0% | 3.0 | 2.5 | 0.800 |" in text and "**-20.0%**" in text


@pytest.mark.bench
def test_gpu_bench_fsdp_completes_on_cpu() -> None:
    """`python bench/gpu.py --device cpu --fsdp`, shortened: two torchrun jobs of 2 gloo ranks each."""
    done = subprocess.run(
        [sys.executable, "gpu.py", "--device", "cpu", "--fsdp", "--steps", "1"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "task.parallelism=fsdp" in done.stdout and "tokens/s vs dense under FSDP2" in done.stdout


@pytest.mark.bench
def test_gpu_bench_completes_on_cpu_with_tiny() -> None:
    """`python bench/gpu.py --device cpu --model tiny`, shortened: compiles every compiled variant."""
    done = subprocess.run(
        [sys.executable, "gpu.py", "--device", "cpu", "--model", "tiny", "--steps", "1", "--repeats", "1"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "this run should take about" in done.stdout
    assert "compiled / eager tokens/s, ours dense" in done.stdout and "n/a on CPU" in done.stdout


def test_data_bench_builds_distinct_documents_of_the_asked_size(common: ModuleType, tmp_path: Path) -> None:
    data = importlib.import_module("data")
    data.build_corpus(tmp_path, 5e6)
    lines = (tmp_path / "train.txt").read_text(encoding="utf-8").splitlines()
    size = (tmp_path / "train.txt").stat().st_size
    assert 5e6 <= size < 5e6 + 4e6  # whole copies of the 3.7 MB sample, the last one crossing the size
    assert len(set(lines)) == len(lines) and lines[0].startswith("[0] ") and lines[-1].startswith("[1] ")
    assert (tmp_path / "validation.txt").read_text(encoding="utf-8").count("\n") == 149

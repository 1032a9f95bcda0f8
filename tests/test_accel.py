"""GPU speed-ups, tested on CPU: fused AdamW, activation checkpointing, torch.compile, MFU; their config errors.

The compiled-vs-eager tolerance comes from a measurement: 20 steps of `tiny` with RigL (masks updated every 5 steps),
torch 2.13 on CPU, differed by at most 9.5e-7 in the logged loss (1.5e-7 relative); the test allows 1e-6 relative.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelzoo import checkpoint as ckpt
from modelzoo.config import load_config, to_object
from modelzoo.config.train import OptimConfig, TrainConfig
from modelzoo.errors import ConfigError
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.train.accel import compiles, fused_problem, fuses_adamw
from modelzoo.train.mfu import mfu, peak_flops, table_peak_tflops
from modelzoo.validate import validate
from tests.conftest import SMALL, killed_at_step, make_config, train_losses

COMPILE_REL_TOLERANCE = 1e-6


def check(*overrides: str) -> None:
    validate(to_object(load_config([*SMALL, *overrides])))


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["task.peak_tflops=0"], "task.peak_tflops", "must be positive"),
        (["task.peak_tflops=-5"], "task.peak_tflops", "must be positive"),
        (["task.compile=true", "backend=cerebras"], "task.compile", "compiles the step itself"),
        (["optim.fused=true", "backend=cerebras"], "optim.fused", "brings its own AdamW"),
    ],
)
def test_bad_speed_settings_name_the_key(overrides: list[str], key: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint) as info:
        check(*overrides)
    assert info.value.key == key


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_names_task_device() -> None:
    with pytest.raises(ConfigError, match="no CUDA device") as info:
        check("task.device=cuda")
    assert info.value.key == "task.device"


def test_compile_without_a_cpp_compiler_names_task_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH on which no compiler exists
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"C\+\+ compiler.*task\.compile=false") as info:
        check("task.compile=true", "task.device=cpu")
    assert info.value.key == "task.compile"
    check("task.device=cpu")  # auto stays eager on CPU and needs no compiler


def test_auto_compiles_and_fuses_on_cuda_except_for_a_backend_with_its_own_compiler() -> None:
    auto, optim = TrainConfig(), OptimConfig()
    assert compiles(auto, "cuda") and fuses_adamw(optim, "cuda")
    assert not compiles(auto, "cpu") and not fuses_adamw(optim, "cpu")
    assert not compiles(auto, "cuda", own_compiler=True) and not fuses_adamw(optim, "cuda", own_compiler=True)
    assert compiles(TrainConfig(compile=True), "cpu") and fuses_adamw(OptimConfig(fused=True), "cpu")


def test_fused_problem_names_the_devices_that_have_kernels() -> None:
    assert fused_problem("meta") is not None and "cuda" in fused_problem("meta")
    assert fused_problem("cuda") is None


def test_peak_table_and_mfu() -> None:
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert table_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert table_peak_tflops("NVIDIA L4", "fp32") == 60.0
    assert table_peak_tflops("NVIDIA L40S", "bf16") == 362.0  # not the L4's
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert table_peak_tflops("NVIDIA A10G", "bf16") is None  # unknown: MFU is n/a unless task.peak_tflops is set
    assert peak_flops(torch.device("cpu"), "bf16") is None
    assert peak_flops(torch.device("cpu"), "bf16", override_tflops=2.0) == 2e12
    assert mfu(6e9, 1e4, 1e14) == pytest.approx(0.6)
    assert mfu(6e9, 1e4, None) is None


def test_cpu_run_logs_mfu_only_against_a_given_peak(tmp_path: Path, cache_dir: Path) -> None:
    steps = ["task.max_steps=2", "task.log_every=1", "task.export=false", "task.device=cpu"]
    summary = Pretraining(make_config(tmp_path / "na", cache_dir, *steps)).fit()
    assert summary.mfu is None and summary.peak_memory_gib is None
    summary = Pretraining(make_config(tmp_path / "peak", cache_dir, *steps, "task.peak_tflops=0.5")).fit()
    expected = summary.dense_flops / summary.seconds / 0.5e12
    assert summary.mfu == pytest.approx(expected, rel=1e-6)
    assert [float(row["mfu"]) > 0 for row in metrics(tmp_path / "peak")] == [True, True]
    assert all(row["mfu"] == row["peak_mem_gib"] == "" for row in metrics(tmp_path / "na"))


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [row for row in csv.DictReader(f) if row["train_loss"]]


def masks_and_state(trainer: Pretraining) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Masks by name, and each sparse weight's AdamW moments at its pruned positions."""
    masks = {sp.name: sp.mask.clone() for sp in trainer.sparsifier.params}
    pruned = [
        value[~sp.mask]
        for sp in trainer.sparsifier.params
        for key, value in trainer.loop.optimizer.state[sp.param].items()
        if key in ("exp_avg", "exp_avg_sq")
    ]
    return masks, pruned


RIGL = ["sparsity=rigl_75", "sparsity.update.freq=3", "task.log_every=1", "task.export=false"]


def test_fused_adamw_keeps_masks_state_masking_and_exact_resume(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fused AdamW (CPU kernels since torch 2.4) with RigL: moments stay zero where masks are false, losses match
    the foreach AdamW to rounding, and a resumed run equals the uninterrupted one bit for bit."""
    steps = [*RIGL, "task.max_steps=8", "task.checkpoint_every=4", "task.eval_every=8"]
    fused = Pretraining(make_config(tmp_path / "fused", cache_dir, *steps, "optim.fused=true"))
    assert fused.loop.optimizer.defaults["fused"]
    fused.fit()
    masks, pruned = masks_and_state(fused)
    assert all(bool((p == 0).all()) for p in pruned) and pruned
    assert all(bool((fused.model.get_parameter(n)[~m] == 0).all()) for n, m in masks.items())
    foreach = Pretraining(make_config(tmp_path / "foreach", cache_dir, *steps, "optim.fused=false"))
    assert not foreach.loop.optimizer.defaults["fused"]
    foreach.fit()
    a, b = train_losses(tmp_path / "fused"), train_losses(tmp_path / "foreach")
    assert [float(x) for _, x in a] == pytest.approx([float(x) for _, x in b], rel=1e-5)

    with killed_at_step(monkeypatch, 6):
        Pretraining(make_config(tmp_path / "crashed", cache_dir, *steps, "optim.fused=true")).fit()
    Pretraining(make_config(tmp_path / "crashed", cache_dir, *steps, "optim.fused=true", "task.resume=true")).fit()
    assert train_losses(tmp_path / "crashed") == a


def test_activation_checkpointing_gives_the_same_losses(tmp_path: Path, cache_dir: Path) -> None:
    """Bit for bit, with dropout on (checkpointing replays the RNG state, so the recomputed masks are the same)."""
    steps = [*RIGL, "task.max_steps=4", "task.eval_every=4", "model.dropout=0.1"]
    plain = Pretraining(make_config(tmp_path / "plain", cache_dir, *steps))
    plain.fit()
    checkpointed = Pretraining(make_config(tmp_path / "ac", cache_dir, *steps, "task.activation_checkpointing=true"))
    assert checkpointed.model.transformer.h[0].forward.__name__ == "run"  # the wrapper is on
    checkpointed.fit()
    assert train_losses(tmp_path / "ac") == train_losses(tmp_path / "plain")
    assert masks_and_state(checkpointed)[0].keys() == masks_and_state(plain)[0].keys()
    assert all(torch.equal(m, masks_and_state(plain)[0][n]) for n, m in masks_and_state(checkpointed)[0].items())


# 20 steps of tiny (context 64 so that compiling takes about a minute on 2 CPU cores), masks updated every 5 steps.
TINY = [
    "model=tiny",
    "data.seq_len=64",
    "task.batch_size=8",
    "task.micro_batch_size=8",
    "task.max_steps=20",
    "task.log_every=1",
    "task.eval_every=20",
    "task.checkpoint_every=10",
    "task.export=false",
    "task.device=cpu",
    "sparsity=rigl_75",
    "sparsity.update.freq=5",
]


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Pretraining]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = tmp_path_factory.mktemp("compiled") / "run"
    trainer = Pretraining(make_config(run, cache_dir, *TINY, "task.compile=true"))
    trainer.fit()
    trainer.graph_breaks = dict(counters["graph_break"])
    trainer.graphs = counters["stats"]["unique_graphs"]
    return run, trainer


@pytest.mark.slow
def test_compiled_training_equals_eager_without_graph_breaks(
    compiled_run: tuple[Path, Pretraining], tmp_path: Path, cache_dir: Path
) -> None:
    run, compiled = compiled_run
    assert compiled.graph_breaks == {}
    assert compiled.graphs == 2  # the training forward and the evaluation forward: nothing recompiles per step
    eager = Pretraining(make_config(tmp_path / "eager", cache_dir, *TINY, "task.compile=false"))
    eager.fit()
    got, want = train_losses(run), train_losses(tmp_path / "eager")
    assert [s for s, _ in got] == [s for s, _ in want] and len(got) == 20
    assert [float(x) for _, x in got] == pytest.approx([float(x) for _, x in want], rel=COMPILE_REL_TOLERANCE)
    ours, theirs = masks_and_state(compiled)[0], masks_and_state(eager)[0]
    assert all(torch.equal(m, theirs[n]) for n, m in ours.items())
    at_10 = load_file(ckpt.checkpoint_dir(run) / "step_000010" / ckpt.MODEL_FILE)
    assert any(not torch.equal(m, at_10[f"{n}_mask"]) for n, m in ours.items())  # RigL moved masks after step 10


@pytest.mark.slow
def test_compiled_resume_is_exact(
    compiled_run: tuple[Path, Pretraining],
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """A compiled run killed after step 15 and resumed from its step-10 checkpoint repeats steps 11-15 (across the
    RigL update at 15) bit for bit, on one thread. With more threads inductor's CPU code scatter-adds the embedding
    gradient with atomic adds, so runs agree to rounding only (measured: 5e-7 relative from one run to the next, as
    eager CUDA's atomic embedding backward does); the comparison with the uninterrupted run uses the compile
    tolerance."""
    import torch._dynamo

    run, _ = compiled_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch._dynamo.reset()
    with killed_at_step(monkeypatch, 16):
        Pretraining(make_config(tmp_path / "crashed", cache_dir, *TINY, "task.compile=true")).fit()
    before = train_losses(tmp_path / "crashed")
    assert [s for s, _ in before] == [str(s) for s in range(1, 16)]
    torch._dynamo.reset()
    Pretraining(make_config(tmp_path / "crashed", cache_dir, *TINY, "task.compile=true", "task.resume=true")).fit()
    after = train_losses(tmp_path / "crashed")
    assert after[:15] == before
    want = train_losses(run)
    assert [float(x) for _, x in after] == pytest.approx([float(x) for _, x in want], rel=COMPILE_REL_TOLERANCE)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_cuda_defaults_compile_fuse_tf32_and_log_mfu_and_memory(tmp_path: Path, cache_dir: Path) -> None:
    steps = ["task.max_steps=4", "task.log_every=2", "task.export=false", "task.precision=bf16", "task.device=cuda"]
    trainer = Pretraining(make_config(tmp_path / "run", cache_dir, *steps, "task.peak_tflops=100"))
    assert trainer.loop.optimizer.defaults["fused"]
    assert torch.get_float32_matmul_precision() == "high"
    summary = trainer.fit()
    assert 0 < summary.mfu < 1 and summary.peak_memory_gib > 0
    assert all(float(row["mfu"]) > 0 and float(row["peak_mem_gib"]) > 0 for row in metrics(tmp_path / "run"))


@pytest.mark.cuda
@cuda
def test_cuda_compiled_checkpointed_bf16_matches_eager(tmp_path: Path, cache_dir: Path) -> None:
    steps = [*RIGL, "task.max_steps=6", "task.eval_every=6", "task.precision=bf16", "task.device=cuda"]
    Pretraining(make_config(tmp_path / "eager", cache_dir, *steps, "task.compile=false")).fit()
    Pretraining(
        make_config(tmp_path / "fast", cache_dir, *steps, "task.compile=true", "task.activation_checkpointing=true")
    ).fit()
    got, want = train_losses(tmp_path / "fast"), train_losses(tmp_path / "eager")
    # bf16 rounding differs between fused and eager kernels: a few 1e-3 relative after 6 steps is rounding
    assert [float(x) for _, x in got] == pytest.approx([float(x) for _, x in want], rel=2e-2)

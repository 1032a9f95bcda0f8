"""Shared fixtures. `../shared/data` tests skip only when ../shared is absent (CI fails on that itself)."""

from __future__ import annotations

import csv
import hashlib
import math
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from modelzoo.config import Config
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.train.loop import TrainLoop
from modelzoo.validate import validated_config

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


# A model and batch small enough for a few training steps per test on 2 CPU cores. The tests of the training
# loop pin the reference backend (auto would pick cerebras in the Cerebras venv); test_cerebras overrides it.
SMALL = [
    "backend=masked_dense",
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "model.n_inner=256",
    "model.n_positions=64",
    "model.vocab_size=1024",
    "task.batch_size=8",
    "task.micro_batch_size=4",
    "task.eval_batches=4",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
]


# sparsity=gmp_75 over 400 steps, from its formula: level 0.375 (1 - cos(pi u / 300)) set at u = 0, 10, ..., 300
# and held until the next update (10 steps; the last one 100, to the end of the run): 45.9%.
GMP_75_AVERAGE = (sum(10 * 0.375 * (1 - math.cos(math.pi * u / 300)) for u in range(0, 300, 10)) + 100 * 0.75) / 400


@pytest.fixture(scope="session")
def cstorch():
    """cerebras.pytorch, for tests marked `cerebras`: skipped where it cannot run, failed instead under
    MODELZOO_REQUIRE_CEREBRAS=1 (CI's Cerebras stage)."""
    from modelzoo.backends.cerebras import CerebrasBackend

    reason = CerebrasBackend.unavailable_reason()
    if reason:
        if os.environ.get("MODELZOO_REQUIRE_CEREBRAS") == "1":
            pytest.fail(f"MODELZOO_REQUIRE_CEREBRAS=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    import cerebras.pytorch

    return cerebras.pytorch


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_command(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, **kwargs)` in a session of its own, whose whole
    process group (torchrun's workers too) is killed after `timeout` seconds, failing the test."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"{' '.join(map(str, command))} ran past {timeout} s; its stderr ends:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def make_config(run_dir: Path, cache_dir: Path, *overrides: str) -> Config:
    return validated_config([*SMALL, f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides])


# The shared pre-training run of `trained_run`: the overrides on top of SMALL (a test that resumes it repeats them,
# raising task.max_steps past TRAINED_STEPS).
TRAINED_STEPS = 4
TRAINED_RUN = (
    f"task.max_steps={TRAINED_STEPS}",
    "task.checkpoint_every=2",
    "task.eval_every=2",
    "task.log_every=1",
)


def _fingerprint(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a run directory but its lock file."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".lock" not in p.name
    }


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Path]:
    """One finished pre-training run, trained once per session and shared read-only by the tests of evaluation,
    fine-tuning, generation and the resume guards: the small test model of SMALL (2 layers, n_embd 64, vocab
    1024, 64 positions) on the packaged PubMed sample, the default sparsity static_75 on the masked_dense backend,
    TRAINED_STEPS=4 steps of batch 8, evaluated and checkpointed every 2 steps (step_000002 and step_000004 kept),
    train loss logged every step, exported to `hf/`, with its summary.json. It lives in
    `<pytest tmp>/trained_run0/run` (the directory is named `run`; the evaluation table shows `run/hf`).

    Tests must not modify it: one that writes to a run (resumes it, damages a checkpoint, exports into it)
    works on `copy_run(trained_run, tmp_path)`. The fixture checks at the end of the session that no file of the
    run changed."""
    run = tmp_path_factory.mktemp("trained_run") / "run"
    Pretraining(make_config(run, cache_dir, *TRAINED_RUN)).fit()
    before = _fingerprint(run)
    yield run
    assert _fingerprint(run) == before, f"a test modified the shared trained_run {run}: copy it with copy_run"


def copy_run(run: Path, tmp_path: Path, without: tuple[str, ...] = ()) -> Path:
    """A copy of `run` as `tmp_path / "run"` for a test to change, less the top-level entries named in `without`."""
    target = tmp_path / "run"
    shutil.copytree(run, target)
    for name in without:
        shutil.rmtree(target / name)
    return target


def train_losses(run_dir: Path) -> list[tuple[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [(row["step"], row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]]


@contextmanager
def killed_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> Iterator[None]:
    """Inside, the training loop raises KeyboardInterrupt when it starts optimizer step `step` (as a kill would
    stop it: after the checkpoints of the earlier steps, before this one's); the `with` expects that."""
    original, calls = TrainLoop.train_step, {"n": 0}

    def train_step(self: TrainLoop, *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("killed")
        return original(self, *batch)

    monkeypatch.setattr(TrainLoop, "train_step", train_step)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(TrainLoop, "train_step", original)

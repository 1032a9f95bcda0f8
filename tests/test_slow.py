"""Slow end-to-end tests, run in their own CI stage: `pytest -m slow`."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelzoo import checkpoint as ckpt
from modelzoo.restore import restore_model

pytestmark = pytest.mark.slow


def modelzoo(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "modelzoo", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> str:
    try:
        out, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"{process.args} ran past 900 s; its output ends:\n{out[-3000:]}")
    assert process.returncode == 0, out[-3000:]
    return out


def test_default_run_learns_and_exports(tmp_path: Path) -> None:
    """The README's main job with every default: the model learns, holds 75% sparsity and exports to HF."""
    run = tmp_path / "run"
    out = finish(modelzoo("pretrain", f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path))
    assert "75.0% of targeted weights are zero" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 400
    assert summary["val_loss"] < summary["unigram_loss"] - 1.0  # well below the unigram baseline
    assert summary["sparsity"] == pytest.approx(0.75, abs=1e-4)
    assert summary["dense_flops"] / summary["sparse_flops"] == pytest.approx(1.69, abs=0.01)

    model = restore_model(ckpt.latest_checkpoint(run)).model
    hf = AutoModelForCausalLM.from_pretrained(summary["export_dir"]).eval()
    x = torch.randint(0, 4096, (2, 128))
    with torch.no_grad():
        assert (model.eval()(x)[0] - hf(x).logits).abs().max().item() <= 1e-5
    sidecar = json.loads((run / "hf" / "sparsity.json").read_text())
    assert sidecar["global_sparsity"] == pytest.approx(0.75, abs=1e-4)


def losses(run: Path) -> list[tuple[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [(r["step"], r["train_loss"]) for r in csv.DictReader(f)]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path) -> None:
    common = [
        f"data.cache_dir={tmp_path / 'cache'}",
        "task.max_steps=40",
        "task.checkpoint_every=5",
        "task.log_every=1",
        "task.eval_every=20",
        "task.export=false",
    ]
    finish(modelzoo("pretrain", f"run_dir={tmp_path / 'full'}", *common, cwd=tmp_path))

    killed = tmp_path / "killed"
    process = modelzoo("pretrain", f"run_dir={killed}", *common, cwd=tmp_path)
    deadline = time.monotonic() + 600
    while (latest := ckpt.latest_checkpoint(killed)) is None or latest.name < "step_000010":
        assert process.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert ckpt.latest_checkpoint(killed).name < "step_000040"

    finish(modelzoo("pretrain", f"run_dir={killed}", *common, "task.resume=true", cwd=tmp_path))
    assert losses(killed) == losses(tmp_path / "full")
    final = "checkpoints/step_000040/model.safetensors"
    assert (killed / final).read_bytes() == (tmp_path / "full" / final).read_bytes()

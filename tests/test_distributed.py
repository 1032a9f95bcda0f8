"""Data parallelism under torchrun (2 CPU processes, gloo) against one process on the same global batch.

The torchrun comparison starts three training processes: it is marked `distributed` and runs in its own CI stage
(`pytest -m distributed`), not in the default suite.
"""

from __future__ import annotations

import csv
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelzoo.errors import ConfigError
from tests.conftest import SMALL, make_config, run_command, train_losses

# RigL with a mask update every 2 steps: the update reads the dense gradient, which DDP does not average.
RUN = [
    *SMALL,
    "task.micro_batch_size=2",
    "task.max_steps=6",
    "task.log_every=1",
    "task.eval_every=3",
    "task.checkpoint_every=3",
    "task.export=false",
    "data.seq_len=64",
    "sparsity=rigl_75",
    "sparsity.update.freq=2",
    "backend=masked_dense",
]


def _pretrain(run_dir: Path, cache_dir: Path, ranks: int, *overrides: str, rendezvous: str | None = None) -> None:
    """`modelzoo pretrain` in one process or under torchrun: `--standalone`, or the multi-node command of docs/gpu.md
    (a c10d rendezvous at `rendezvous`, host:port) with one node."""
    where = ["--standalone"]
    if rendezvous:
        where = ["--nnodes=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={rendezvous}", "--rdzv_id=test"]
    launcher = ["-m", "torch.distributed.run", *where, f"--nproc_per_node={ranks}"] if ranks > 1 else []
    command = [sys.executable, *launcher, "-m", "modelzoo", "pretrain", *RUN, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 6 steps of a 2-layer model take about 30 s on 2 loaded cores; 10 minutes means a hung rendezvous
    done = run_command([*command, f"run_dir={run_dir}", f"data.cache_dir={cache_dir}"], timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


# Llama (GQA, untied head): its second RigL update (step 4) swapped one pair of 16,384 up_proj regrowth candidates
# between 1 and 2 ranks (measured: gradients tied to float32 summation order), so masks and weights are compared
# exactly after the first update (the step-3 checkpoint); the losses agree to 1e-5 through step 6 all the same.
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("name", "family", "exact_until"),
    [("tiny", (), 6), ("llama_tiny", ("model=llama_tiny", "model.n_kv_head=1"), 3)],
    ids=["gpt", "llama"],
)
def test_two_ranks_train_like_one_process_on_the_same_global_batch(
    tmp_path: Path, cache_dir: Path, name: str, family: tuple[str, ...], exact_until: int
) -> None:
    _pretrain(tmp_path / "single", cache_dir, 1, *family)  # also fills the data cache both runs share
    _pretrain(tmp_path / "ddp", cache_dir, 2, *family)

    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert [step for step, _ in ddp] == [str(s) for s in range(1, 7)]
    for (_, a), (_, b) in zip(single, ddp, strict=True):
        assert float(a) == pytest.approx(float(b), abs=1e-5)
    one, two = _weights(tmp_path / "single", exact_until), _weights(tmp_path / "ddp", exact_until)
    masks = [key for key in one if key.endswith("_mask")]
    assert masks and all(torch.equal(one[key], two[key]) for key in masks)
    moved = _weights(tmp_path / "ddp", 6)
    assert any(not torch.equal(_weights(tmp_path / "ddp", 3)[key], moved[key]) for key in masks)  # RigL moved them
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=0)
    assert (tmp_path / "ddp" / "pretrain.log").read_text().count(f"model {name}:") == 1  # rank 0 alone logs


@pytest.mark.distributed
def test_two_ranks_distil_like_one_process(tmp_path: Path, cache_dir: Path) -> None:
    """Each rank runs its own frozen teacher (not DDP-wrapped) on its own micro-batches: the loss and its terms,
    averaged over the ranks, equal one process's on the same global batch."""
    _pretrain(tmp_path / "teacher", cache_dir, ranks=1)
    teacher = f"task.distill.teacher={tmp_path / 'teacher'}"
    _pretrain(tmp_path / "single", cache_dir, 1, teacher)
    _pretrain(tmp_path / "ddp", cache_dir, 2, teacher)
    columns = ("train_loss", "lm_loss", "kd_loss", "hidden_loss")
    single, ddp = (list(csv.DictReader((tmp_path / run / "metrics.csv").open())) for run in ("single", "ddp"))
    assert len(single) == len(ddp) == 6
    for a, b in zip(single, ddp, strict=True):
        for column in columns:
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-5), (a["step"], column)


@pytest.mark.distributed
def test_multi_node_rendezvous_command_with_one_node(tmp_path: Path, cache_dir: Path) -> None:
    """The torchrun command docs/gpu.md gives for N nodes (c10d rendezvous), run with N=1 and 2 ranks."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    steps = ["task.max_steps=2", "task.eval_every=2", "task.checkpoint_every=2"]
    _pretrain(tmp_path / "single", cache_dir, 1, *steps)
    _pretrain(tmp_path / "ddp", cache_dir, 2, *steps, rendezvous=f"localhost:{port}")
    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert [s for s, _ in ddp] == ["1", "2"]
    assert [float(b) for _, b in ddp] == pytest.approx([float(a) for _, a in single], abs=1e-5)


def test_global_batch_must_split_over_the_ranks(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"task.batch_size.*x 2 ranks"):
        make_config(tmp_path, cache_dir, "task.batch_size=12", "task.micro_batch_size=4")


@pytest.mark.distributed
def test_two_ranks_refuse_the_default_batch_in_one_line_from_rank_0(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m modelzoo pretrain` with the defaults (global batch 16, micro-batch 16): on main
    each rank printed the refusal (naming only task.batch_size), rank 0 exited 2 and rank 1 got SIGTERM. Now one line
    from rank 0 names the micro-batch size that works, and every rank exits with code 2 (torchrun's failure table
    lists each rank's exit code) without a traceback of ours."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [sys.executable, *launcher, "-m", "modelzoo", "pretrain", f"run_dir={tmp_path / 'run'}"]
    done = run_command(command, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert ours == [
        "error: task.batch_size: 16 is not divisible by task.micro_batch_size=16 x 2 ranks: set "
        "task.micro_batch_size=8, or set task.batch_size to one of (allowed: 32, 64, 96, 128)"
    ], done.stderr
    assert re.findall(r"exitcode +: (-?\d+)", done.stderr) == ["2", "2"], done.stderr
    assert "modelzoo/" not in "".join(line for line in done.stderr.splitlines() if line.lstrip().startswith("File"))
    assert not (tmp_path / "run").exists()  # refused before anything was written

"""FSDP2 (`task.parallelism=fsdp`) under torchrun: 2 ranks against one process, exact resume after kill -9, a 2-rank
checkpoint resumed by one process, the Hugging Face export, and masking of sharded gradients.

Each run starts training processes (gloo on CPU; NCCL on 2 GPUs where there are): marked `distributed`, run in
that CI stage (`pytest -m distributed`), not in the default suite.
"""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modelzoo import checkpoint as ckpt
from modelzoo.errors import ConfigError
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity
from modelzoo.sparsity.shards import local
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.train.parallel import fsdp_problem, shard_masks
from tests.conftest import SMALL, killed_at_step, make_config, run_command, train_losses

pytestmark = pytest.mark.skipif(fsdp_problem() is not None, reason=str(fsdp_problem()))

RUN = [
    *SMALL,
    "task.micro_batch_size=2",
    "task.max_steps=6",
    "task.log_every=1",
    "task.eval_every=3",
    "task.checkpoint_every=2",
    "task.keep_checkpoints=3",
    "data.seq_len=64",
    "backend=masked_dense",
]
RIGL = ("sparsity=rigl_75", "sparsity.update.freq=2")  # mask updates at steps 2, 4 and 6
FSDP = "task.parallelism=fsdp"
# NCCL where two GPUs are there (each rank its own), gloo on CPU always.
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 CUDA devices")
BACKENDS = [pytest.param("gloo", id="gloo"), pytest.param("nccl", id="nccl", marks=TWO_GPUS)]


def _command(run_dir: Path, cache_dir: Path, ranks: int, *overrides: str) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    where = [f"run_dir={run_dir}", f"data.cache_dir={cache_dir}"]
    return [sys.executable, *launcher, "-m", "modelzoo", "pretrain", *RUN, *overrides, *where]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _pretrain(run_dir: Path, cache_dir: Path, ranks: int, *overrides: str) -> None:
    # 6 steps of a 2-layer model take about 20 s on 2 loaded cores; 10 minutes means a hung collective
    done = run_command(_command(run_dir, cache_dir, ranks, *overrides), timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, sharded (`dcp/`) or whole (`model.safetensors`)."""
    path = ckpt.checkpoint_dir(run_dir) / f"step_{step:06d}"
    return ckpt.read_sharded_model(path) if ckpt.is_sharded(path) else load_file(path / ckpt.MODEL_FILE)


def _assert_same_model(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], rtol: float) -> None:
    """The same masks and zero patterns, and every tensor within `rtol` relative (Frobenius) difference."""
    assert any(key.endswith("_mask") for key in one)
    for key in one.keys() & two.keys():  # safetensors stores a tied weight once, DCP under each name
        if key.endswith("_mask"):
            assert torch.equal(one[key], two[key]), key
            continue
        assert torch.equal(one[key] == 0, two[key] == 0), key
        difference = (one[key] - two[key]).norm() / one[key].norm().clamp_min(1e-12)
        assert difference < rtol, (key, float(difference))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """2 gloo ranks, RigL, 6 steps, checkpoints at 2, 4 and 6, exported at the end."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    _pretrain(run_dir, cache_dir, 2, *RIGL, FSDP, "task.export=true")
    return run_dir


# Measured (2026-12-07, torch 2.13 CPU): GPT matches one process to 1.4e-5 relative through 3 RigL updates, Llama
# to 9.2e-8 through 2; Llama's third update (step 6) swaps regrowth candidates tied to float32 summation order, as
# under DDP (tests/test_distributed.py), so its weights are compared at step 4, after two updates.
@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("family", "sparsity", "step"),
    [
        ((), ("sparsity=static_75",), 6),
        ((), RIGL, 6),
        (("model=llama_tiny", "model.n_kv_head=1"), ("sparsity=static_75",), 6),
        (("model=llama_tiny", "model.n_kv_head=1"), RIGL, 4),
    ],
    ids=["gpt-static", "gpt-rigl", "llama-static", "llama-rigl"],
)
def test_fsdp_two_ranks_train_like_one_process(
    tmp_path: Path, cache_dir: Path, backend: str, family: tuple[str, ...], sparsity: tuple[str, ...], step: int
) -> None:
    device = ("task.device=cuda",) if backend == "nccl" else ()
    _pretrain(tmp_path / "single", cache_dir, 1, *family, *sparsity, *device, "task.export=false")
    _pretrain(tmp_path / "fsdp", cache_dir, 2, *family, *sparsity, *device, FSDP, "task.export=false")
    single, fsdp = train_losses(tmp_path / "single"), train_losses(tmp_path / "fsdp")
    assert [s for s, _ in fsdp] == [str(s) for s in range(1, 7)]
    assert [float(b) for _, b in fsdp] == pytest.approx([float(a) for _, a in single], abs=1e-5)
    assert (ckpt.checkpoint_dir(tmp_path / "fsdp") / f"step_{step:06d}" / ckpt.DCP_DIR / "__1_0.distcp").is_file()
    _assert_same_model(_weights(tmp_path / "single", step), _weights(tmp_path / "fsdp", step), rtol=1e-4)


@pytest.mark.distributed
def test_fsdp_evaluates_batches_that_do_not_divide_among_the_ranks(tmp_path: Path, cache_dir: Path) -> None:
    """One validation batch on 2 ranks: rank 1 has none of its own but must join rank 0's forward (FSDP's
    all-gathers are collectives); before, such a run hung at its first evaluation."""
    _pretrain(tmp_path / "run", cache_dir, 2, FSDP, "task.export=false", "task.eval_batches=1")
    with (tmp_path / "run" / "metrics.csv").open(newline="") as f:
        evaluated = [row["step"] for row in csv.DictReader(f) if row["val_loss"]]
    assert evaluated == ["3", "6"]


def _steps_logged(run_dir: Path) -> int:
    """The steps in a live run's metrics.csv (its last line may be half written)."""
    try:
        return len(train_losses(run_dir))
    except (FileNotFoundError, KeyError, TypeError):
        return 0


@pytest.mark.distributed
def test_fsdp_resume_after_kill_9_is_bit_identical(tmp_path: Path, cache_dir: Path, fsdp_run: Path) -> None:
    """torchrun and both ranks killed with SIGKILL at a random step (perhaps while writing a checkpoint), then
    `task.resume=true` on 2 ranks: the weights, masks and losses equal the uninterrupted run's bit for bit."""
    run_dir, kill_at = tmp_path / "killed", random.randint(3, 5)
    command = _command(run_dir, cache_dir, 2, *RIGL, FSDP, "task.export=true")
    with subprocess.Popen(command, env=ENV, start_new_session=True, stderr=subprocess.DEVNULL) as process:
        deadline = time.monotonic() + 300
        while _steps_logged(run_dir) < kill_at:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    _pretrain(run_dir, cache_dir, 2, *RIGL, FSDP, "task.export=true", "task.resume=true")
    for step in (4, 6):
        whole, resumed = _weights(fsdp_run, step), _weights(run_dir, step)
        assert all(torch.equal(whole[key], resumed[key]) for key in whole), f"killed at step {kill_at}"
    assert train_losses(run_dir)[-1] == train_losses(fsdp_run)[-1]


@pytest.mark.distributed
def test_two_rank_fsdp_checkpoint_resumes_in_one_process(tmp_path: Path, cache_dir: Path, fsdp_run: Path) -> None:
    """The step-2 checkpoint of 2 ranks (one `.distcp` file each) continues in one process: losses of steps 3-6
    within 1e-5 of the 2-rank run's (measured: equal as logged, weights 5.2e-6 relative apart at step 6)."""
    run_dir = tmp_path / "moved"
    shutil.copytree(fsdp_run, run_dir)
    for later in ("step_000004", "step_000006"):
        shutil.rmtree(ckpt.checkpoint_dir(run_dir) / later)
    (ckpt.checkpoint_dir(run_dir) / ckpt.LATEST).write_text("step_000002\n")
    _pretrain(run_dir, cache_dir, 1, *RIGL, FSDP, "task.export=false", "task.resume=true")
    one, two = dict(train_losses(run_dir)), dict(train_losses(fsdp_run))
    assert [float(one[str(s)]) for s in range(3, 7)] == pytest.approx(
        [float(two[str(s)]) for s in range(3, 7)], abs=1e-5
    )
    _assert_same_model(_weights(fsdp_run, 6), _weights(run_dir, 6), rtol=1e-4)


@pytest.mark.distributed
def test_a_corrupted_shard_stops_every_rank_naming_the_file(tmp_path: Path, cache_dir: Path, fsdp_run: Path) -> None:
    """Rank 0 alone checks the checkpoint against its manifest and every rank stops with its error (no rank left
    waiting in a collective): exit code 2 on each rank, the corrupted `.distcp` file named."""
    run_dir = tmp_path / "corrupted"
    shutil.copytree(fsdp_run, run_dir)
    shard = sorted((ckpt.latest_checkpoint(run_dir) / "dcp").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    command = _command(run_dir, cache_dir, 2, *RIGL, FSDP, "task.max_steps=8", "task.resume=true")
    done = run_command(command, timeout=300, env=ENV)
    assert done.returncode != 0
    assert re.findall(r"exitcode +: (-?\d+)", done.stderr) == ["2", "2"], done.stderr[-3000:]
    assert f"{shard.name} is corrupted: its sha256 does not match" in done.stderr, done.stderr[-3000:]


@pytest.mark.distributed
def test_fsdp_export_is_a_plain_transformers_model_with_zeros_intact(tmp_path: Path, fsdp_run: Path) -> None:
    """The export at the end of training (gathered on rank 0) and `modelzoo export` of the sharded checkpoint (one
    process) hold the same tensors; every position the final masks prune is zero in the loaded HF model."""
    done = run_command(
        [sys.executable, "-m", "modelzoo", "export", f"run_dir={fsdp_run}", f"task.output_dir={tmp_path / 'hf'}"],
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trained = AutoModelForCausalLM.from_pretrained(fsdp_run / "hf").state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert trained.keys() == exported.keys() and all(torch.equal(trained[k], exported[k]) for k in trained)
    masks = {k: m for k, m in _weights(fsdp_run, 6).items() if k.endswith("_mask")}
    assert len(masks) == 8
    for name, mask in masks.items():
        weight = trained[name.removesuffix("_mask")].T  # GPT-2's Conv1D stores (in, out)
        assert weight.shape == mask.shape and not weight[~mask].any(), name


def _mask_where_the_gradient_is(rank: int, port: int, out: Path) -> None:
    """One rank of `test_masking_sharded_gradients_equals_masking_before_the_reduction`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    x = torch.randn(8, 6) * (1 + rank)  # each rank its own batch
    grads = {}
    for sharded in (False, True):
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        model.load_state_dict(torch.load(out / "init.pt"))
        sparsifier = MaskedSparsity(SparsityConfig(sparsity=0.5, param_filter=["*.weight"]), seed=0)
        sparsifier.apply(model)  # gradient hooks: what one process or DDP does before the reduction
        if sharded:
            from torch.distributed.fsdp import fully_shard  # after the skip on torch without it

            fully_shard(model)
            shard_masks(model)  # as task.parallelism=fsdp does: each mask a DTensor of its weight's rows
        loss = model(x).pow(3).sum()
        loss.backward()
        if sharded:
            sparsifier.mask_gradients()
            grads[sharded] = [local(p.grad) for p in model.parameters()]
        else:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(2)
            grads[sharded] = [p.grad.chunk(2)[rank] for p in model.parameters()]
    torch.save(grads, out / f"grads{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_masking_sharded_gradients_equals_masking_before_the_reduction(tmp_path: Path) -> None:
    """FSDP2 reduce-scatters unmasked gradients and `MaskedSparsity.mask_gradients` masks this rank's rows after;
    one process (and DDP) masks in gradient hooks before the reduction. The reduction is elementwise, so the two give
    the same bits on every rank's rows (a wrong row offset for the whole mask, or masking the unreduced gradient,
    would not)."""
    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).state_dict(), tmp_path / "init.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_mask_where_the_gradient_is, args=(port, tmp_path), nprocs=2)
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        assert any(bool((g == 0).any()) for g in grads[True])  # the masks pruned something here
        for before, after in zip(grads[False], grads[True], strict=True):
            assert torch.equal(before, after)


def test_sharded_resume_keeps_the_zero_step_that_makes_optimizer_state_out_of_the_sparsity_schedule(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sharded checkpoint (here written by one process under `task.parallelism=fsdp`) loads into optimizer state
    that DCP's `get_optimizer_state_dict` first creates with a zero step of lr 0. The sparsity plug-in must not count
    that step: with RigL updating every step it took it for step 1's update and raised for want of a dense
    gradient (no backward ran). The resumed run equals the uninterrupted one."""
    steps = ("sparsity=rigl_75", "sparsity.update.freq=1", "task.max_steps=4", "task.checkpoint_every=2", FSDP)
    Pretraining(make_config(tmp_path / "whole", cache_dir, *steps)).fit()
    with killed_at_step(monkeypatch, 3):
        Pretraining(make_config(tmp_path / "resumed", cache_dir, *steps)).fit()
    assert ckpt.is_sharded(ckpt.latest_checkpoint(tmp_path / "resumed"))
    Pretraining(make_config(tmp_path / "resumed", cache_dir, *steps, "task.resume=true")).fit()
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "whole")
    whole, resumed = _weights(tmp_path / "whole", 4), _weights(tmp_path / "resumed", 4)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_fsdp_is_refused_on_a_backend_it_cannot_shard(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"task.parallelism: fsdp .* cerebras .*allowed: masked_dense"):
        make_config(tmp_path, cache_dir, "backend=cerebras", FSDP)


def test_fsdp_needs_public_fully_shard(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch without `torch.distributed.fsdp.fully_shard` (torch < 2.6, e.g. the Cerebras venv's 2.4, whose private
    FSDP2 fails on CPU creating CUDA streams) is refused at config time, naming the key and what works."""
    monkeypatch.delattr(torch.distributed.fsdp, "fully_shard")
    with pytest.raises(
        ConfigError, match=r"task.parallelism: fsdp: torch .* has no torch.distributed.fsdp.fully_shard"
    ):
        make_config(tmp_path, cache_dir, FSDP)
    make_config(tmp_path, cache_dir, "task.parallelism=ddp")

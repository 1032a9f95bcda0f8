"""Runs that fail loudly instead of lying: divergence, resume guards, no pickle from checkpoints, one writer per
run directory, and the smaller edges of checkpoint and config handling."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelzoo import checkpoint as ckpt
from modelzoo import runlock
from modelzoo.backends.cerebras.checkpoint import load_cstorch
from modelzoo.cli import main
from modelzoo.config import load_config, to_object
from modelzoo.distributed import Distributed
from modelzoo.downstream.evaluate import load_model
from modelzoo.errors import CheckpointError, TrainingDiverged
from modelzoo.export.hf import export_hf, load_hf
from modelzoo.finite import nonfinite_tensors
from modelzoo.inference import load_for_inference
from modelzoo.models.gpt import GPT
from modelzoo.optim import lr_factor
from modelzoo.tasks.finetune import run as finetune
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.train.guards import NonFiniteGuard, training_tensors
from tests.conftest import REPO, TRAINED_RUN, TRAINED_STEPS, copy_run, make_config, train_losses

TWO_STEPS = ("task.max_steps=2", "task.checkpoint_every=2", "task.eval_every=2", "task.log_every=1")
DIVERGING = ("optim.lr=1e4", "optim.warmup_steps=0")  # NaN from the second step on (the repro)
SAMPLE = REPO / "modelzoo" / "data" / "samples" / "pubmed"
# Resuming conftest's finished `trained_run` for two more steps.
RESUME = (*TRAINED_RUN, f"task.max_steps={TRAINED_STEPS + 2}", "task.resume=true")


def rewrite(checkpoint: Path, name: str, write) -> None:
    """Replace one file of a checkpoint and re-hash the manifest, as someone handing it on could."""
    step = ckpt.verify_checkpoint(checkpoint)["step"]
    write(checkpoint / name)
    (checkpoint / ckpt.MANIFEST_FILE).unlink()
    ckpt._write_manifest(checkpoint, step)


def poison_weights(checkpoint: Path, key: str = "transformer.h.1.mlp.c_fc.weight") -> str:
    def write(path: Path) -> None:
        weights = load_file(path)
        weights[key][0, 0] = math.nan
        save_file(weights, path)

    rewrite(checkpoint, ckpt.MODEL_FILE, write)
    return key


# ---- non-finite training -----------------------------------------------------------------------------------


def test_divergence_stops_the_run_naming_the_step_and_writes_nothing(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    cfg = make_config(run, cache_dir, *DIVERGING, "task.max_steps=6", "task.checkpoint_every=2", "task.log_every=2")
    with pytest.raises(TrainingDiverged, match=r"^step 2: loss .*gradient norm nan"):
        Pretraining(cfg).fit()
    assert ckpt.latest_checkpoint(run) is None
    assert not (run / "hf").exists()


def test_skip_leaves_out_a_bounded_number_of_updates(tmp_path: Path, cache_dir: Path) -> None:
    skip = ("task.on_nonfinite=skip", "task.max_nonfinite_skips=2")
    trainer = Pretraining(make_config(tmp_path / "run", cache_dir, *DIVERGING, "task.max_steps=8", *skip))
    with pytest.raises(TrainingDiverged, match=r"^step 4: .*3 non-finite steps exceed task\.max_nonfinite_skips=2"):
        trainer.fit()
    assert nonfinite_tensors(training_tensors(trainer.model, trainer.loop.optimizer)) == []  # no skipped update applied


def test_skip_never_applies_a_non_finite_update() -> None:
    guard = NonFiniteGuard("skip", 1, Distributed())
    finite, nan, inf = torch.tensor(1.0), torch.tensor(math.nan), torch.tensor(math.inf)
    assert guard.allows_update(1, finite, finite)
    assert not guard.allows_update(2, finite, nan)
    with pytest.raises(TrainingDiverged, match=r"step 3: loss inf.*2 non-finite steps exceed"):
        guard.allows_update(3, inf, finite)


def test_stop_names_the_first_non_finite_step_not_a_later_one() -> None:
    guard = NonFiniteGuard("stop", 0, Distributed())
    guard.observe(1, torch.tensor(2.0), torch.tensor(1.0))
    guard.check()
    guard.observe(2, torch.tensor(math.inf), torch.tensor(3.0))
    guard.observe(3, torch.tensor(math.nan), torch.tensor(math.nan))
    with pytest.raises(TrainingDiverged, match=r"^step 2: loss inf, gradient norm 3"):
        guard.check()


def test_ranks_agree_on_a_step_only_one_rank_sees_as_non_finite(tmp_path: Path) -> None:
    script = """
import math, sys, torch, torch.distributed as dist
from modelzoo.distributed import Distributed
from modelzoo.train.guards import NonFiniteGuard
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=int(sys.argv[2]), world_size=2)
loss = torch.tensor(math.inf if dist.get_rank() == 1 else 1.0)
print(NonFiniteGuard("skip", 5, Distributed(dist.get_rank(), 0, 2)).allows_update(1, loss, torch.tensor(1.0)))
"""
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen([sys.executable, "-c", script, str(store), str(r)], stdout=subprocess.PIPE, text=True, env=env)
        for r in range(2)
    ]
    assert [p.communicate(timeout=120)[0].strip() for p in ranks] == ["False", "False"]


def test_nonfinite_checkpoint_is_refused_by_resume_export_generate_evaluate(
    trained_run: Path, tmp_path: Path, cache_dir
):
    run = copy_run(trained_run, tmp_path, without=("hf",))  # the run with no export, as the test expects
    key = poison_weights(ckpt.latest_checkpoint(run))
    with pytest.raises(CheckpointError, match=rf"{key} holds NaN or Inf"):
        Pretraining(make_config(run, cache_dir, *RESUME))
    with pytest.raises(SystemExit):
        main(["export", f"run_dir={run}"])
    assert not (run / "hf").exists()
    with pytest.raises(CheckpointError, match=rf"{key} holds NaN or Inf"):
        load_for_inference(run, "run_dir", "cpu", "fp32", "none", tokens=1)
    with pytest.raises(CheckpointError, match=rf"{key} holds NaN or Inf"):
        load_model(str(run), to_object(load_config(["task=evaluate", f"run_dir={run}"])), "run_dir")


def test_nonfinite_weights_are_neither_exported_nor_imported(tmp_path: Path, tiny_model: GPT) -> None:
    export_hf(tiny_model, tmp_path / "hf")
    with torch.no_grad():
        tiny_model.transformer.h[0].attn.c_proj.weight[0, 0] = math.inf
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_proj\.weight holds NaN or Inf"):
        export_hf(tiny_model, tmp_path / "hf")
    load_hf(tmp_path / "hf")  # the earlier, finite export is untouched
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    state["transformer.h.1.mlp.c_fc.weight"][3] = math.nan
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight holds NaN or Inf"):
        load_hf(tmp_path / "hf")


# ---- no pickle from checkpoints ----------------------------------------------------------------------------


class Payload:
    """Creates a file when unpickled: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_in_trainer_state_does_not_run(trained_run: Path, tmp_path: Path, cache_dir: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    marker = tmp_path / "pwned"
    checkpoint = ckpt.latest_checkpoint(run)
    state = ckpt.load_training_state(checkpoint)[1]  # loads with weights_only=True: tensors and plain values only
    rewrite(checkpoint, ckpt.TRAINER_FILE, lambda path: torch.save({**state, "x": Payload(marker)}, path))
    with pytest.raises(CheckpointError, match=r"trainer\.pt holds pickled Python objects"):
        Pretraining(make_config(run, cache_dir, *RESUME))
    assert not marker.exists()


def test_a_pickle_given_as_a_cstorch_checkpoint_is_not_unpickled(tmp_path: Path) -> None:
    marker, file = tmp_path / "pwned", tmp_path / "model.mdl"
    torch.save({"model": Payload(marker)}, file)
    with pytest.raises(CheckpointError, match=r"is not a cstorch\.save \(HDF5\) file"):
        load_cstorch(file)  # cstorch.load would fall back to torch.load, which unpickles on torch 2.4
    assert not marker.exists()


# ---- resume guards -----------------------------------------------------------------------------------------


def test_resume_on_other_documents_is_refused_and_keeps_the_tokenizer(trained_run: Path, tmp_path: Path, cache_dir):
    run = copy_run(trained_run, tmp_path)
    tokenizer = (run / "tokenizer" / "tokenizer.json").read_bytes()
    other = [f"data.train_files=[{SAMPLE / 'validation.txt.gz'}]"]
    with pytest.raises(
        CheckpointError,
        match=r"other documents: data\.train\[0\]=.*train\.txt\.gz, but the config reads .*validation\.txt\.gz",
    ):
        Pretraining(make_config(run, cache_dir, *RESUME, *other))
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.seq_len=32", "data.seq_len=64 but the config has data.seq_len=32"),
        ("task.batch_size=4", "task.batch_size=8 but the config has task.batch_size=4"),
        ("tokenizer.vocab_size=512", r"tokenizer\.vocab_size=1024 but the config has tokenizer\.vocab_size=512;"),
        ("model.n_layer=3", r"model\.n_layer=2 but the config has model\.n_layer=3;"),
        ("sparsity.sparsity=0.5", r"sparsity\.sparsity=0\.75 but the config has sparsity\.sparsity=0\.5;"),
    ],
)
def test_resume_changing_the_runs_meaning_is_refused(trained_run: Path, cache_dir: Path, override: str, message: str):
    with pytest.raises(CheckpointError, match=message):
        Pretraining(make_config(trained_run, cache_dir, *RESUME, override))


def test_checkpoint_tensor_of_another_shape_is_refused_naming_it(trained_run: Path, tmp_path: Path, cache_dir):
    """A tensor reshaped under a re-hashed manifest: one line naming the file, the tensor and both shapes."""
    run = copy_run(trained_run, tmp_path)
    checkpoint = ckpt.latest_checkpoint(run)
    weights = load_file(checkpoint / ckpt.MODEL_FILE)
    name = "transformer.h.0.mlp.c_proj.bias"
    weights[name] = weights[name][:-1].clone()
    rewrite(checkpoint, ckpt.MODEL_FILE, lambda path: save_file(weights, path))
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors: tensor {re.escape(name)} has shape \[63\] but the model needs \[64\]",
    ):
        Pretraining(make_config(run, cache_dir, *RESUME))


def test_resume_with_a_changed_tokenizer_directory_is_refused(trained_run: Path, tmp_path: Path, cache_dir: Path):
    """Same config (`tokenizer.path`), other tokenizer: only its fingerprint in the checkpoint tells."""
    shutil.copytree(trained_run / "tokenizer", tmp_path / "tok")
    steps = (*TWO_STEPS, "task.export=false", f"tokenizer.path={tmp_path / 'tok'}")
    Pretraining(make_config(tmp_path / "run", cache_dir, *steps)).fit()
    definition = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    definition["model"]["merges"] = definition["model"]["merges"][:-1]  # one merge fewer: other token ids
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(definition))
    with pytest.raises(CheckpointError, match=r"was trained with tokenizer\.fingerprint=\w+ but the config gives"):
        Pretraining(make_config(tmp_path / "run", cache_dir, *steps, "task.max_steps=4", "task.resume=true"))


def test_resume_applies_the_configs_optimizer_hyperparameters(trained_run: Path, tmp_path: Path, cache_dir: Path):
    run = copy_run(trained_run, tmp_path)
    cfg = make_config(run, cache_dir, *RESUME, "optim.lr=1e-3")
    cfg.optim.weight_decay = 0.05
    cfg.optim.betas = [0.8, 0.9]
    resumed = Pretraining(cfg)
    decayed, other = resumed.loop.optimizer.param_groups
    assert decayed["lr"] == 1e-3 * lr_factor(TRAINED_STEPS, cfg.optim, TRAINED_STEPS + 2)
    assert decayed["initial_lr"] == 1e-3 and resumed.loop.scheduler.base_lrs == [1e-3, 1e-3]
    assert (decayed["weight_decay"], other["weight_decay"]) == (0.05, 0.0)
    assert decayed["betas"] == (0.8, 0.9)
    assert resumed.loop.optimizer.state  # the moments came from the checkpoint


def test_resuming_a_finished_run_changes_nothing(trained_run: Path, tmp_path: Path, cache_dir: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".lock" not in p.name}
    summary = Pretraining(make_config(run, cache_dir, *TRAINED_RUN, "task.export=false", "task.resume=true")).fit()
    assert math.isfinite(summary.val_loss) and summary.steps == TRAINED_STEPS
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".lock" not in p.name} == files


def test_a_run_stopped_after_its_last_checkpoint_writes_its_summary_on_resume(trained_run, tmp_path, cache_dir) -> None:
    run = copy_run(trained_run, tmp_path)
    (run / "summary.json").unlink()
    summary = Pretraining(make_config(run, cache_dir, *TRAINED_RUN, "task.export=false", "task.resume=true")).fit()
    assert math.isfinite(summary.val_loss) and (run / "summary.json").is_file()
    assert [step for step, _ in train_losses(run)] == [str(s) for s in range(1, TRAINED_STEPS + 1)]


# ---- one writer per run directory --------------------------------------------------------------------------

HOLD = "import sys, time; from modelzoo import runlock; runlock.acquire(sys.argv[1]); print('held', flush=True); {}"


def hold_in_another_process(run_dir: Path, then: str = "time.sleep(600)") -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(then), str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_is_refused_naming_the_holder(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    holder = hold_in_another_process(run)
    try:
        with pytest.raises(runlock.RunDirLocked, match=rf"in use by process {holder.pid}"):
            Pretraining(make_config(run, cache_dir, "task.max_steps=1"))
        done = subprocess.run(
            [sys.executable, "-m", "modelzoo", "pretrain", f"run_dir={run}", "task.max_steps=1"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2 and f"in use by process {holder.pid}" in done.stderr
        cfg = to_object(load_config(["task=finetune", "task.pretrained=nowhere", f"task.output_dir={run}"]))
        with pytest.raises(runlock.RunDirLocked, match=rf"in use by process {holder.pid}"):
            finetune(cfg)
    finally:
        holder.kill()
        holder.wait(timeout=60)


def test_kill_9_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = hold_in_another_process(tmp_path)
    with pytest.raises(runlock.RunDirLocked, match=rf"in use by process {holder.pid}"):
        runlock.acquire(tmp_path)  # held while the holder lives
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    runlock.acquire(tmp_path)  # the kernel dropped the dead holder's lock: no RunDirLocked
    runlock.release(tmp_path)


# ---- the smaller edges -------------------------------------------------------------------------------------


def test_leftovers_of_a_killed_latest_switch_are_removed(trained_run: Path, tmp_path: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    stale = ckpt.checkpoint_dir(run) / ".latest.tmp-999999"
    stale.write_text("step_000001\n")
    model = GPT(to_object(load_config(["model.n_layer=1", "model.n_embd=32", "model.n_head=2"])).model)
    ckpt.save_weights(run, TRAINED_STEPS + 1, model, "seed: 1\n")
    assert not stale.exists()


def test_checkpoints_and_exports_follow_the_umask(tmp_path: Path, tiny_model: GPT) -> None:
    previous = os.umask(0o022)
    try:
        path = ckpt.save_weights(tmp_path, 1, tiny_model, "seed: 1\n")
        hf = export_hf(tiny_model, tmp_path / "hf")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o755
    assert hf.stat().st_mode & 0o777 == 0o755


def test_corrupted_optimizer_state_blocks_resume_but_not_export(trained_run: Path, tmp_path: Path, cache_dir, capsys):
    run = copy_run(trained_run, tmp_path, without=("hf",))  # the run with no export, as the test expects
    optimizer = ckpt.latest_checkpoint(run) / ckpt.OPTIMIZER_FILE
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    main(["export", f"run_dir={run}"])
    assert "exported" in capsys.readouterr().out
    load_hf(run / "hf")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is corrupted"):
        Pretraining(make_config(run, cache_dir, *RESUME))


def test_an_unknown_key_is_named_with_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["flops", "task.foo=1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "task.foo: unknown key (allowed: name, max_steps," in err
    assert "+task.foo" not in err

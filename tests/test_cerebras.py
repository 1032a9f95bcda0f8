"""The Cerebras backend on the real cerebras.pytorch, and the checks that run without it.

Tests marked `cerebras` need cerebras.pytorch (its own venv: `bash scripts/make_cerebras_venv.sh .venv-cerebras`).
Without it they skip, naming why, unless MODELZOO_REQUIRE_CEREBRAS=1, when they fail (CI sets it). They run on
cstorch's CPU backend, one per process, so the CSX lowering runs `modelzoo pretrain` in a subprocess.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modelzoo import checkpoint as ckpt
from modelzoo.backends.cerebras import CSTORCH_VERSION, CerebrasBackend
from modelzoo.backends.cerebras.checkpoint import (
    checkpoint_to_cstorch,
    cstorch_to_checkpoint,
    load_cstorch,
    save_cstorch,
)
from modelzoo.backends.cerebras.cluster import cluster_config
from modelzoo.backends.cerebras.environment import environment_problem
from modelzoo.backends.cerebras.lowering import mlir_sparsity
from modelzoo.backends.cerebras.sparsity import check_algorithms
from modelzoo.backends.cerebras.stages import CHECKPOINTS, check_eval_batches, checkpoint_steps
from modelzoo.cluster import ClusterConfig
from modelzoo.config import Config, load_config, to_object
from modelzoo.config.train import OptimConfig, TrainConfig
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.export.hf import export_hf
from modelzoo.models.registry import build_model
from modelzoo.optim import build_optimizer, lr_factor
from modelzoo.restore import restore_model
from modelzoo.sparsity.config import NMPattern, SparsityConfig
from modelzoo.sparsity.names import select_parameters
from modelzoo.sparsity.plan import plan_groups
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.train.loop import TrainLoop
from modelzoo.validate import validate
from tests.conftest import REPO, make_config

STEPS = 8
# Dynamic algorithms update every 2 steps until step 8, so masks move within the run.
ALGORITHMS = {
    "static": ["sparsity=static_75"],
    "gmp": ["sparsity=gmp_75", "sparsity.sparsity.half_period=8", "sparsity.update.freq=2", "sparsity.update.stop=9"],
    "set": [
        "sparsity=set_75",
        "sparsity.drop_fraction.half_period=8",
        "sparsity.update.freq=2",
        "sparsity.update.stop=8",
    ],
    "rigl": [
        "sparsity=rigl_75",
        "sparsity.drop_fraction.half_period=8",
        "sparsity.update.freq=2",
        "sparsity.update.stop=8",
    ],
}
RUN = ["task.log_every=1", f"task.max_steps={STEPS}", f"task.eval_every={STEPS}", f"task.checkpoint_every={STEPS}"]
# Each model family at conftest's SMALL size; Llama with grouped-query attention (2 query heads per key/value head),
# which torch 2.4's SDPA cannot do itself (`causal_attention` repeats the key/value heads there).
FAMILIES = {"gpt": (), "llama": ("model=llama_tiny", "model.n_kv_head=1")}
# What each family is checked against masked_dense on: GPT every algorithm, Llama static and RigL (mask updates).
FAMILY_RUNS = [*(("gpt", a) for a in ALGORITHMS), ("llama", "static"), ("llama", "rigl")]
by_family = pytest.mark.parametrize(("family", "algorithm"), FAMILY_RUNS, ids=[f"{f}-{a}" for f, a in FAMILY_RUNS])


def run(tmp_path: Path, cache_dir: Path, backend: str, algorithm: str, *extra: str) -> Pretraining:
    trainer = Pretraining(
        make_config(
            tmp_path / f"{backend}-{algorithm}", cache_dir, f"backend={backend}", *ALGORITHMS[algorithm], *RUN, *extra
        )
    )
    trainer.fit()
    return trainer


def logged(trainer: Pretraining, column: str) -> list[float]:
    """The values of `column` in the rows of the run's metrics.csv that have one."""
    with (trainer.run_dir / "metrics.csv").open() as f:
        return [float(row[column]) for row in csv.DictReader(f) if row[column]]


def losses(trainer: Pretraining) -> list[float]:
    return logged(trainer, "train_loss")


def rewound(run_dir: Path, step: int, to: Path) -> Path:
    """A copy of `run_dir` as it stood when it wrote its checkpoint of `step` (later checkpoints, ours and the
    `cstorch.save` files, left out): the run that resumes from it repeats the same config, as a job restarted
    after being killed does."""
    later = [p.name for p in ckpt.checkpoint_dir(run_dir).glob("step_*") if int(p.name.removeprefix("step_")) > step]
    later += [name for n, name in ((int(p.stem.split("_")[1]), p.name) for p in cstorch_files(run_dir)) if n > step]
    shutil.copytree(run_dir, to, symlinks=True, ignore=lambda directory, names: [n for n in names if n in later])
    (ckpt.checkpoint_dir(to) / ckpt.LATEST).write_text(f"step_{step:06d}\n")
    return to


def cstorch_files(run_dir: Path) -> list[Path]:
    return list((run_dir / "cerebras" / CHECKPOINTS).glob("checkpoint_*.mdl"))


def masks(trainer: Pretraining) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items() if k.endswith("_mask")}


# ---- on cstorch's CPU backend -----------------------------------------------------------------------------


@pytest.mark.cerebras
@by_family
def test_pretraining_matches_masked_dense(
    cstorch, tmp_path: Path, cache_dir: Path, family: str, algorithm: str
) -> None:
    """Same seed, data and config on both backends: identical initial masks (static: identical throughout),
    loss curves within 1e-5 relative (measured: static 3.4e-6, GMP 4.0e-6, RigL 3.5e-6; RigL was 1.2e-4 before
    the drop-fraction cache was cleared each step) and 1e-4 for SET (it regrows at random, so its masks differ from
    masked_dense's and the gap grows with the steps: measured 2.3e-5 on the packed corpus, 5.05e-5 at step 8 on the
    sharded one), and cstorch keeps pruned weights and Adam state at zero. Llama (grouped-query attention, RoPE,
    SwiGLU) measured: static 7.1e-6, RigL 6.2e-6. RigL's validation loss gets 2e-5 (Llama measured 1.13e-5, GPT
    6.4e-7): its masks end a few entries apart (2 to 32 of a weight's 4096 to 16384 for Llama), since Adam moves
    each regrown weight by about the LR, so the next drop by magnitude breaks near-ties on float noise."""
    model = FAMILIES[family]
    reference = run(tmp_path, cache_dir, "masked_dense", algorithm, *model, "task.export=false")
    cerebras = run(tmp_path, cache_dir, "cerebras", algorithm, *model, "task.export=false")
    assert isinstance(cerebras.loop.optimizer, cstorch.optim.AdamW)
    assert isinstance(cerebras.sparsifier.group, cstorch.sparse.Group)
    assert cerebras.sparsifier.mask_names() == reference.sparsifier.mask_names()
    ours, theirs = losses(reference), losses(cerebras)
    assert len(ours) == len(theirs) == STEPS
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6)  # the first step sees the same masks and weights
    assert theirs == pytest.approx(ours, rel=1e-4 if algorithm == "set" else 1e-5)
    assert theirs[-1] < theirs[0] - 0.1  # it learns (by 0.13 and more over these 8 steps)
    # Each step's sparsity comes from cstorch's computed-sparsity hook: its masks' level. masked_dense counts exact
    # zeros, which after a SET / RigL update include the regrown connections (kept, at zero until trained).
    sparsity = logged(cerebras, "sparsity")
    if algorithm in ("static", "gmp"):  # every kept weight is non-zero; GMP's level follows its schedule
        assert sparsity == pytest.approx(logged(reference, "sparsity"), abs=1e-6)
        assert sparsity[-1] > sparsity[0] if algorithm == "gmp" else sparsity == [0.75] * STEPS
    else:
        assert sparsity == pytest.approx([0.75] * STEPS, abs=1e-6)
        assert all(z >= s - 1e-6 for z, s in zip(logged(reference, "sparsity"), sparsity, strict=True))
    # Validation as masked_dense computes it, from cstorch's traced evaluation step in its own executor.
    val = cerebras.loop.last_eval["val_loss"]
    val_rel = {"set": 1e-4, "rigl": 2e-5}.get(algorithm, 1e-5)
    assert val == pytest.approx(reference.loop.last_eval["val_loss"], rel=val_rel)
    final = masks(cerebras)
    if algorithm == "static":
        assert all(torch.equal(final[k], v) for k, v in masks(reference).items())
    else:  # both moved their masks from the common start (SET regrows at random: the two need not agree)
        start = masks(
            Pretraining(
                make_config(tmp_path / "start", cache_dir, "backend=masked_dense", *ALGORITHMS[algorithm], *model)
            )
        )
        for trainer in (reference, cerebras):
            assert any(not torch.equal(v, masks(trainer)[k]) for k, v in start.items())
    params = dict(cerebras.model.named_parameters())
    for name in cerebras.sparsifier.names:
        param, mask = params[name], final[name + "_mask"]
        level = 1 - mask.float().mean()
        assert level == pytest.approx(0.75, abs=2e-3), name
        assert not param[~mask].any(), name
        state = cerebras.loop.optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert not state[key][~mask].any(), (name, key)


@pytest.fixture
def cs_backend(cstorch, tmp_path: Path):
    """cstorch's CPU backend (one per process: an earlier test's is reused)."""
    return cstorch.current_backend(raise_exception=False, raise_warning=False) or cstorch.backend(
        "CPU", artifact_dir=str(tmp_path)
    )


def used_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each later `optimizer.step()`, recorded as the step starts."""
    seen: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(float(opt.param_groups[0]["lr"])))
    return seen


@pytest.mark.cerebras
@pytest.mark.parametrize(
    ("warmup", "decay"), [(7, "cosine"), (5, "linear"), (4, "constant"), (1, "cosine"), (0, "linear")]
)
def test_cstorch_schedule_is_lr_factor(cstorch, cs_backend, warmup: int, decay: str) -> None:
    """The backend's cstorch scheduler gives the optimizer `lr * lr_factor(step)` at every step, warm-up, decay
    and the floor after max_steps included, within 1e-5 relative (cstorch computes it in float32)."""
    cfg = OptimConfig(lr=6e-4, warmup_steps=warmup, decay=decay, min_lr_ratio=0.1)
    max_steps = 30
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, cfg, cstorch.optim.AdamW)
    scheduler = CerebrasBackend().scheduler(optimizer, cfg, max_steps)
    assert isinstance(scheduler, cstorch.optim.lr_scheduler.LRScheduler)
    seen = used_lrs(optimizer)
    for _ in range(max_steps + 5):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    expected = [cfg.lr * lr_factor(s, cfg, max_steps) for s in range(max_steps + 5)]
    assert seen == pytest.approx(expected, rel=1e-5)


@pytest.mark.cerebras
def test_lr_of_every_step_matches_masked_dense_and_resumes(cstorch, tmp_path: Path, cache_dir: Path) -> None:
    """Over a run with warm-up and cosine decay, the LR each optimizer step used on cstorch equals masked_dense's
    within 1e-5 relative, the metrics log it, and a run resumed from its checkpoint continues the schedule; the
    `cstorch.save` files rotate as our checkpoints do."""
    common = ["sparsity=dense", "optim.warmup_steps=3", "optim.decay=cosine", "task.log_every=1"]
    common += ["task.max_steps=8", "task.eval_every=8", "task.checkpoint_every=2", "task.keep_checkpoints=3"]
    common += ["task.export=false"]
    resume = ["backend=cerebras", *common, "task.resume=true"]
    runs = {}
    for backend in ("masked_dense", "cerebras"):
        trainer = Pretraining(make_config(tmp_path / backend, cache_dir, f"backend={backend}", *common))
        runs[backend] = (trainer, used_lrs(trainer.loop.optimizer))
        trainer.fit()
    (_, ours), (cerebras, theirs) = runs["masked_dense"], runs["cerebras"]
    assert isinstance(cerebras.loop.scheduler, cstorch.optim.lr_scheduler.SequentialLR)
    assert len(ours) == len(theirs) == 8
    assert ours[0] == pytest.approx(3e-3 / 3) and ours[2] == pytest.approx(3e-3) and ours[-1] < ours[3]
    assert theirs == pytest.approx(ours, rel=1e-5)
    assert logged(cerebras, "lr") == pytest.approx(ours, rel=1e-5)
    # The cstorch.save files rotate with ours: the newest task.keep_checkpoints stay.
    assert sorted(int(p.stem.split("_")[1]) for p in cstorch_files(cerebras.run_dir)) == [4, 6, 8]

    resumed = Pretraining(make_config(rewound(cerebras.run_dir, 4, tmp_path / "resumed"), cache_dir, *resume))
    assert resumed.step == 4
    after = used_lrs(resumed.loop.optimizer)
    resumed.fit()
    assert after == theirs[4:]


@pytest.mark.cerebras
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cerebras_initial_masks_are_masked_dense_masks(cstorch, tmp_path: Path, cache_dir: Path, family: str) -> None:
    """Before any step, both backends hold the masks drawn from the seed (also for the dynamic algorithms)."""
    for algorithm in ("static", "rigl"):
        extra = (*ALGORITHMS[algorithm], *FAMILIES[family], "task.max_steps=1", "task.export=false")
        a = Pretraining(make_config(tmp_path / f"a-{algorithm}", cache_dir, "backend=masked_dense", *extra))
        b = Pretraining(make_config(tmp_path / f"b-{algorithm}", cache_dir, "backend=cerebras", *extra))
        assert masks(a).keys() == masks(b).keys()
        assert all(torch.equal(v, masks(b)[k]) for k, v in masks(a).items())


@pytest.mark.cerebras
def test_filters_select_the_same_weights_both_ways(cstorch, tmp_path: Path, cache_dir: Path) -> None:
    """A Cerebras Model Zoo recipe's filters (their layer names) select our weights through cstorch, and our
    default selects what cstorch's default selects in a Cerebras model: applied to our names, cstorch's own
    default would also take the embeddings (`wte`, `wpe` do not say "embedding"), which is why the backend
    hands cstorch the resolved names."""
    recipe = Pretraining(
        make_config(
            tmp_path / "recipe",
            cache_dir,
            "backend=cerebras",
            "sparsity=cerebras_gpt3_125m_rigl75",
            "task.export=false",
        )
    )
    expected = [n for n, p in recipe.model.named_parameters() if p.ndim == 2 and ".h." in n]
    assert [n.removesuffix("_mask") for n in recipe.sparsifier.mask_names()] == expected
    assert set(recipe.sparsifier.group.sparse_params) == set(expected)

    ours = Pretraining(make_config(tmp_path / "default", cache_dir, "backend=cerebras", "task.export=false"))
    assert set(ours.sparsifier.group.sparse_params) == set(select_parameters(ours.model, None)) == set(expected)

    model = Pretraining(make_config(tmp_path / "dense", cache_dir, "backend=cerebras", "sparsity=dense")).model
    raw = cstorch.sparse.configure({"sparsity": 0.5})
    raw.apply(model)
    assert set(raw.sparse_params) - set(expected) == {"transformer.wte.weight", "transformer.wpe.weight"}


def killed_after_checkpoint(run_dir: Path, start: str, step: int) -> Path:
    """`start` (Python that trains into `run_dir`) in a subprocess, SIGKILLed as soon as its checkpoint closure has
    written the `cstorch.save` file of `step`; then the run directory as a restarted job finds it, with our
    converted checkpoints and later cstorch files removed, so that a resume has only the closure's file."""
    process = subprocess.Popen(
        [sys.executable, "-c", start], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    files = run_dir / "cerebras" / CHECKPOINTS
    while not (files / f"checkpoint_{step}.mdl").exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (files / f"checkpoint_{step}.mdl").exists(), process.stderr.read().decode()[-3000:]
    for path in files.glob("checkpoint_*"):
        if path.suffix != ".mdl" or int(path.stem.removeprefix("checkpoint_")) > step:
            path.unlink()
    shutil.rmtree(ckpt.checkpoint_dir(run_dir), ignore_errors=True)
    return run_dir


def resumable_run(run_dir: str | Path, cache_dir: str | Path, algorithm: str, *extra: str) -> Pretraining:
    """The 8-step run of `algorithm` that the kill-and-resume test repeats (importable by its subprocess)."""
    common = ["backend=cerebras", *ALGORITHMS[algorithm], "optim.warmup_steps=2", "optim.decay=cosine"]
    common += ["task.log_every=1", "task.max_steps=8", "task.checkpoint_every=4", "task.eval_every=4"]
    cfg = make_config(Path(run_dir), Path(cache_dir), *common, "task.export=false", *extra)
    if algorithm == "gmp":  # a cycling schedule (no command-line override spells it)
        cfg.sparsity.sparsity = {"type": "cycling", "values": [0.5, 0.6, 0.7, 0.75, 0.8]}
        validate(cfg)
    return Pretraining(cfg)


@pytest.mark.cerebras
@by_family
def test_killed_run_resumes_from_the_closure_checkpoint_bit_for_bit(
    cstorch, tmp_path: Path, cache_dir: Path, family: str, algorithm: str
) -> None:
    """A run SIGKILLed after its checkpoint closure wrote step 4 and resumed from that `cstorch.save` file gives
    the losses, validation losses and final checkpoint of 8 steps in one go, bit for bit, for every algorithm on GPT
    and for static and RigL on Llama, with warm-up and cosine decay, two training executors and an evaluation and
    a checkpoint conversion between them (neither may move the CPU generator that SET's regrowth is seeded from):
    the data position (the loader's state), Adam state, LR schedule, mask update counters and RNG come back from
    the file. GMP follows a cycling schedule, whose position cstorch's own load_state_dict drops."""
    model = FAMILIES[family]
    full = resumable_run(tmp_path / "full", cache_dir, algorithm, *model)
    full.fit()
    start = "from tests.test_cerebras import resumable_run; "
    start += f"resumable_run({str(tmp_path / 'killed')!r}, {str(cache_dir)!r}, {algorithm!r}, *{model!r}).fit()"
    killed = killed_after_checkpoint(tmp_path / "killed", start, 4)
    resumed = resumable_run(killed, cache_dir, algorithm, *model, "task.resume=true")
    assert resumed.step == 4
    resumed.fit()
    trained, evaluated = metrics(full)
    assert metrics(resumed) == (trained, [row for row in evaluated if int(row[0]) > 4])  # killed before step 4's
    a, b = (ckpt.checkpoint_dir(t.run_dir) / "step_000008" / ckpt.MODEL_FILE for t in (full, resumed))
    assert a.read_bytes() == b.read_bytes()

    state = cstorch.load(str(full.run_dir / "cerebras" / CHECKPOINTS / "checkpoint_8.mdl"))
    assert set(state) >= {"model", "optimizer", "schedulers", "sparsity", "dataloader", "global_step"}
    assert state["global_step"] == 8 and state["dataloader"] == {"samples_streamed": 8 * full.loop.settings.batch_size}
    assert sum(k.endswith("_mask") for k in state["model"]) == len(full.sparsifier.mask_names())
    # The Model Zoo's metadata: `cszoo checkpoint convert` reads the format from its version.
    assert state["__metadata__"][-1]["version"] == cstorch.__version__
    assert state["__metadata__"][-1]["params"]["train_input"]["batch_size"] == full.loop.settings.batch_size


@pytest.mark.cerebras
def test_step_closures_read_no_weights_and_run_no_model(
    cstorch, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CS-2 weights come back only in checkpoints: every step closure (training and evaluation) gets its
    values as arguments and touches no parameter or buffer of the model (any torch call on one fails here),
    while the run still logs loss, LR, gradient norm and sparsity, evaluates and saves."""
    trainer = Pretraining(
        make_config(tmp_path / "run", cache_dir, "backend=cerebras", "sparsity=rigl_75", "task.max_steps=4")
    )
    state = {id(t) for t in (*trainer.model.parameters(), *trainer.model.buffers())}
    calls = {"n": 0}

    class NoWeights(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if any(id(a) in state for a in (*args, *(kwargs or {}).values())):
                raise AssertionError(f"a step closure called {func} on the model's weights")
            return func(*args, **(kwargs or {}))

    def guarded(closure):
        def run(*args):
            calls["n"] += 1
            with NoWeights():
                closure(*args)

        return original(run)

    original = cstorch.step_closure
    with pytest.raises(AssertionError, match="on the model's weights"), NoWeights():  # the guard can fail
        trainer.model.transformer.wte.weight.sum()
    monkeypatch.setattr(cstorch, "step_closure", guarded)
    per_weight: list[dict[str, float]] = []
    monkeypatch.setattr(TrainLoop, "log_sparsity", lambda loop, values: values and per_weight.append(values))
    summary = trainer.fit()
    # Each weight's sparsity, handed to the closure as tensors, is logged (TensorBoard `sparsity/<name>`).
    assert per_weight and sorted(per_weight[-1]) == sorted(summary.sparsity_per_param)
    assert all(v == pytest.approx(0.75, abs=2e-3) for v in per_weight[-1].values())
    assert calls["n"] >= 4 + 4  # 4 training steps, 4 evaluation batches
    # The Hugging Face export and the summary's sparsity come from the last checkpoint, not the device's weights.
    saved = load_file(str(ckpt.latest_checkpoint(trainer.run_dir) / ckpt.MODEL_FILE))
    hf = AutoModelForCausalLM.from_pretrained(summary.export_dir).state_dict()
    assert torch.equal(hf["transformer.h.0.mlp.c_fc.weight"], saved["transformer.h.0.mlp.c_fc.weight"].T)
    assert summary.sparsity == pytest.approx(0.75, abs=2e-3)
    with (trainer.run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert all(r["sparsity"] and r["lr"] and r["grad_norm"] for r in rows if r["train_loss"])
    assert rows[-1]["val_loss"] and ckpt.latest_checkpoint(trainer.run_dir).name == "step_000004"


@pytest.mark.cerebras
def test_resume_from_a_cstorch_file_missing_keys_is_refused(cstorch, tmp_path: Path, cache_dir: Path) -> None:
    """A `cstorch.save` file in the run's checkpoints without the keys of a training checkpoint (here one of
    weights and step only) is refused before anything runs, naming the keys and the fix."""
    run_dir = tmp_path / "run"
    save_cstorch(run_dir / "cerebras" / CHECKPOINTS / "checkpoint_4.mdl", {"model": {}, "global_step": 4})
    with pytest.raises(CheckpointError, match=r"lacks the key\(s\) optimizer, schedulers, dataloader") as e:
        Pretraining(make_config(run_dir, cache_dir, "backend=cerebras", "task.resume=true"))
    assert "delete this one to resume from the checkpoint before it" in str(e.value)


def test_evaluation_set_smaller_than_one_batch_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"task\.micro_batch_size") as e:
        check_eval_batches(validation_blocks=3, batch_size=4)
    assert "fewer than one evaluation batch" in str(e.value) and "lower task.micro_batch_size" in str(e.value)
    check_eval_batches(validation_blocks=4, batch_size=4)


@pytest.mark.cerebras
def test_checkpoint_steps_follow_the_global_step(cstorch) -> None:
    """Executor iterations that end a global step divisible by checkpoint_every, after any start, and the last."""
    assert list(checkpoint_steps(0, 8, 4).intervals[0]) == [3, 7]
    assert list(checkpoint_steps(2, 6, 4).intervals[0]) == [1, 5]  # global steps 4 and 8 after a resume at 2
    assert list(checkpoint_steps(4, 3, 5).intervals[0]) == [0, 2]  # global step 5, and the executor's last


def metrics(trainer: Pretraining) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(step, training loss) and (step, validation loss) of each metrics row that has them."""
    with (trainer.run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [(r["step"], r["train_loss"]) for r in rows if r["train_loss"]], [
        (r["step"], r["val_loss"]) for r in rows if r["val_loss"]
    ]


@pytest.mark.cerebras
def test_checkpoint_converts_to_cstorch_and_back_and_to_hf(cstorch, tmp_path: Path, cache_dir: Path) -> None:
    trainer = run(tmp_path, cache_dir, "cerebras", "rigl", "task.export=false")
    ours = ckpt.latest_checkpoint(trainer.run_dir)
    cs_file = checkpoint_to_cstorch(ours, tmp_path / "cstorch" / "checkpoint_8.mdl")
    assert cs_file.read_bytes()[:4] == b"\x89HDF"  # cstorch.save's HDF5, not a torch.save pickle
    state = load_cstorch(cs_file)
    assert state["global_step"] == STEPS
    assert state["__metadata__"] == [
        {"version": cstorch.__version__, "model_name": "GPT", "params": state["__metadata__"][0]["params"]}
    ]
    assert state["__metadata__"][0]["params"]["model"]["num_hidden_layers"] == trainer.cfg.model.n_layer
    saved = load_file(str(ours / ckpt.MODEL_FILE))
    assert state["model"].keys() == saved.keys()
    assert all(torch.equal(state["model"][k], v) for k, v in saved.items())
    assert sum(k.endswith("_mask") for k in state["model"]) == len(trainer.sparsifier.mask_names())
    adam = ckpt.load_training_state(ours)[0]["state"]
    assert adam and all(
        torch.equal(state["optimizer"]["state"][i][key], adam[i][key])
        for i in adam
        for key in ("exp_avg", "exp_avg_sq")
    )

    generator = torch.get_rng_state()
    back = cstorch_to_checkpoint(cs_file, tmp_path / "converted")
    assert torch.equal(torch.get_rng_state(), generator)  # a conversion draws nothing from the caller's generator
    with pytest.raises(CheckpointError, match="holds weights only"):  # no trainer state: it cannot be resumed
        ckpt.load_training_state(back)
    with pytest.raises(CheckpointError, match="already holds checkpoint"):  # never over an existing run
        cstorch_to_checkpoint(cs_file, tmp_path / "converted")
    restored = restore_model(back)
    model, cfg = restored.model, restored.config
    assert cfg.sparsity.algorithm == "rigl"
    reference = trainer.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())

    hf_dir = export_hf(model, tmp_path / "hf", trainer.tokenizer, cfg.sparsity.summary())
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, trainer.model(x)[0], rtol=1e-4, atol=1e-4)
    zero = [float((w == 0).float().mean()) for n, w in hf.state_dict().items() if n.endswith("c_fc.weight")]
    assert all(z >= 0.75 for z in zero)


def lower(tmp_path: Path, cache_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`modelzoo pretrain backend=cerebras cluster=cs2 ...` in its own process (one cstorch backend per process)."""
    command = [
        sys.executable,
        "-m",
        "modelzoo",
        "pretrain",
        "backend=cerebras",
        "cluster=cs2",
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={cache_dir}",
        "task.batch_size=4",
        "task.micro_batch_size=4",
        "data.seq_len=64",
        "model.vocab_size=4096",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)


def sparse_weights(*overrides: str) -> set[str]:
    """The weights a run of `overrides` sparsifies: its sparsity groups planned over its model (built on the meta
    device: the names, not the values, count)."""
    cfg = to_object(load_config(list(overrides)))
    with torch.device("meta"):
        model = build_model(cfg.model)
    return {name for plan in plan_groups(cfg.sparsity, model) for name in plan.names}


def check_lowering(result: subprocess.CompletedProcess, sparse_names: set[str], run_dir: Path | None) -> None:
    """The training program lowered with its sparsity (every one of `sparse_names` annotated at 0.75, nothing else)
    and schedule, and the evaluation program (forward only: no optimizer state); under compile_only (the `run_dir`
    given) the latter in a process of its own."""
    assert result.returncode == 0, result.stderr[-3000:]
    mlir = Path(re.search(r"lowered the training step for the CS-2 to (\S+)", result.stdout).group(1))
    forward = Path(re.search(r"lowered the evaluation step for the CS-2 to (\S+)", result.stdout).group(1))
    assert forward != mlir and "state.model." in forward.read_text()
    assert "state.optimizer" not in forward.read_text() and "state.optimizer" in mlir.read_text()
    if run_dir is not None:  # compile_only: cstorch allows one remote compile per process
        assert "the evaluation step is lowered next, in a new process" in result.stdout
        assert forward.is_relative_to(run_dir / "cerebras" / "lower-evaluation")
    annotated = mlir_sparsity(mlir)
    assert {n for n, level in annotated.items() if level > 0} == sparse_names
    assert all(annotated[n] == pytest.approx(0.75) for n in sparse_names)
    n = len(sparse_names)
    assert f"sparsity annotations: {n} of {n} sparse weights (cs.sparsity 0.75)" in result.stdout
    # The LR is computed in the program from cstorch's schedule step counters (state resources), not held as a
    # constant (torch's LambdaLR lowered with none of these).
    counters = set(re.findall(r'tf\.resource_name = "(state\.schedulers\.[^"]*last_epoch)"', mlir.read_text()))
    assert counters == {f"state.schedulers.0{inner}.last_epoch" for inner in ("", "._schedulers.0", "._schedulers.1")}


@pytest.mark.cerebras
@pytest.mark.parametrize(("model", "n_sparse"), [("tiny", 4 * 4), ("llama_tiny", 4 * 7)])
def test_compile_only_lowers_tiny_models_and_names_what_is_missing(
    cstorch, tmp_path: Path, cache_dir: Path, model: str, n_sparse: int
) -> None:
    """4 blocks of GPT (c_attn, attn.c_proj, c_fc, mlp.c_proj) or of Llama (q, k, v, o, gate, up, down, with
    grouped-query attention and rotary embeddings): each of their sparse weights annotated at 0.75."""
    result = lower(tmp_path, cache_dir, f"model={model}", "cluster.mode=compile_only")
    expected = sparse_weights(f"model={model}")
    assert len(expected) == n_sparse
    check_lowering(result, expected, tmp_path / "run")
    assert "stopped at the remote compile (ClusterConfigError" in result.stdout
    assert "set cluster.mgmt_address=<host>:<port>" in result.stdout
    assert "cluster.credentials_path=<file>" in result.stdout


@pytest.mark.cerebras
@pytest.mark.slow
def test_compile_only_lowers_the_mediswift_med_experiment_at_75_percent(
    cstorch, tmp_path: Path, cache_dir: Path
) -> None:
    """`experiment=mediswift_med` (GPT-3 Medium, its schedule, bf16) at 75%, on the shipped sample and at a batch of
    4 x 64 tokens instead of 256 x 2048 (the program's shapes, not its ops, change with those)."""
    overrides = ("experiment=mediswift_med", "sparsity=static_75", "tokenizer=bpe", "data=pubmed_sample")
    result = lower(tmp_path, cache_dir, *overrides, "cluster.mode=compile_only")
    expected = sparse_weights(*overrides)
    assert len(expected) == 24 * 4
    check_lowering(result, expected, tmp_path / "run")


@pytest.mark.cerebras
def test_bf16_on_cstorch_cpu_is_cstorch_amp_not_torch_autocast(cstorch, tmp_path: Path, cache_dir: Path) -> None:
    """task.precision=bf16 on backend=cerebras: cstorch's half dtype is set before the model is built and the step
    runs under `cstorch.amp.autocast`, not torch's; it trains, close to masked_dense's bf16 run."""
    extra = ("sparsity=static_75", "task.precision=bf16", "task.max_steps=4", "task.log_every=1", "task.export=false")
    reference = Pretraining(make_config(tmp_path / "md", cache_dir, "backend=masked_dense", *extra))
    trainer = Pretraining(make_config(tmp_path / "cs", cache_dir, "backend=cerebras", *extra))
    assert cstorch.amp.get_half_dtype_str() == "bfloat16"
    assert not isinstance(trainer.loop.autocast, torch.autocast) and trainer.loop.scaler is None
    reference.fit()
    trainer.fit()
    assert losses(trainer) == pytest.approx(losses(reference), rel=2e-2)
    assert losses(trainer)[-1] < losses(trainer)[0]


@pytest.mark.cerebras
def test_cbf16_lowers_with_dynamic_loss_scaling(cstorch, tmp_path: Path, cache_dir: Path) -> None:
    """task.precision=cbf16 on a CS-2: the training step with cstorch's dynamic GradScaler lowers."""
    result = lower(tmp_path, cache_dir, "model=tiny", "cluster.mode=compile_only", "task.precision=cbf16")
    check_lowering(result, sparse_weights("model=tiny"), tmp_path / "run")


@pytest.mark.cerebras
@pytest.mark.parametrize("sparsity", ["static_75", "set_75", "rigl_75"])
def test_validate_only_checks_the_program_offline(cstorch, tmp_path: Path, cache_dir: Path, sparsity: str) -> None:
    """Both programs pass cstorch's checks offline, for the dynamic algorithms too: their mask updates (drop and
    grow: a top-k each per weight; SET's random regrowth scores) and the levels cstorch's computed-sparsity hook
    hands the step closure are traced in the training program."""
    result = lower(tmp_path, cache_dir, "model=tiny", "cluster.mode=validate_only", f"sparsity={sparsity}")
    check_lowering(result, sparse_weights("model=tiny", f"sparsity={sparsity}"), run_dir=None)
    mlir = Path(re.search(r"lowered the training step for the CS-2 to (\S+)", result.stdout).group(1)).read_text()
    updates = {"static_75": {}, "set_75": {"TopK": 32, "RandomUniform": 16}, "rigl_75": {"TopK": 32}}
    assert Counter(re.findall(r"cirh\.(TopK|RandomUniform)\b", mlir)) == updates[sparsity]
    assert "passed cstorch's checks (nothing was sent to a cluster)" in result.stdout
    # No task.precision given: the CS-2's default, bf16 (cstorch's "fp32" lowered 457 f16 tensors and no bf16).
    halves = Counter(re.findall(r"x(bf16|f16)>", mlir))
    assert halves["bf16"] > 0 and halves["f16"] == 0


LR_PROBE = """
import json, sys
from pathlib import Path
from modelzoo.train.loop import TrainLoop
from modelzoo.tasks.pretrain import Pretraining
from tests.conftest import make_config

handed, in_step = [], []
train_step = TrainLoop.train_step

def recording(loop, *batch):
    loss, grad_norm, lr = train_step(loop, *batch)
    handed.append(lr)
    return loss, grad_norm, lr

TrainLoop.train_step = recording
run_dir, cache_dir, *overrides = sys.argv[1:]
trainer = Pretraining(make_config(Path(run_dir), Path(cache_dir), *overrides))
optimizer = trainer.loop.optimizer
optimizer.register_step_post_hook(lambda opt, args, kwargs: in_step.append(opt.param_groups[0]["lr"]))
trainer.fit()
same = [a is b for a, b in zip(handed, in_step, strict=True)]
print(json.dumps({"devices": [str(lr.device) for lr in handed], "set_in_step": same}))
"""


@pytest.mark.cerebras
def test_lr_handed_to_the_closure_is_the_one_cstorch_set_in_the_lowered_step(
    cstorch, tmp_path: Path, cache_dir: Path
) -> None:
    """Under validate_only (the CSX lowering), the LR the step closure gets is the tensor of the program that
    cstorch's scheduler put into the optimizer's group inside `optimizer.step()` (its step pre-hook; the program
    computes it from the schedule's step counters, `check_lowering`), which on cstorch's CPU backend is the
    schedule's value (`test_lr_of_every_step_matches_masked_dense_and_resumes`). Catches reading it before the
    step (a host constant, the peak: device cpu) or after the schedule's step (the next step's value)."""
    overrides = ["backend=cerebras", "cluster=cs2", "cluster.mode=validate_only", "model=tiny"]
    overrides += ["task.batch_size=4", "task.micro_batch_size=4", "data.seq_len=64", "model.vocab_size=4096"]
    command = [sys.executable, "-c", LR_PROBE, str(tmp_path / "run"), str(cache_dir), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe == {"devices": ["lazy:0"], "set_in_step": [True]}


@pytest.mark.cerebras
def test_cluster_node_maps_onto_cstorch_cluster_config(cstorch, tmp_path: Path) -> None:
    cluster = ClusterConfig(
        name="cs2",
        target="CSX",
        mgmt_address="mgmt.example:443",
        num_csx=2,
        mount_dirs=[str(tmp_path)],
        job_labels=["team=bio"],
        job_priority="p1",
    )
    cluster.validate("cpu")
    theirs = cluster_config(cluster)
    assert isinstance(theirs, cstorch.distributed.ClusterConfig)
    assert (theirs.mgmt_address, theirs.num_csx, theirs.job_labels) == ("mgmt.example:443", 2, ["team=bio"])
    assert str(REPO) in theirs.python_paths
    assert [m.path for m in theirs.mount_dirs] == [str(tmp_path)]


# ---- failures that need no cerebras.pytorch: one sentence and a fix, before any compute -----------------


def test_environment_problems_say_what_and_how_to_fix() -> None:
    fix = "bash scripts/make_cerebras_venv.sh .venv-cerebras"
    assert environment_problem((3, 11), True, "2.4.0+cu121") is None
    for problem, found in [
        (environment_problem((3, 12), True, "2.4.0"), "needs Python 3.11"),
        (environment_problem((3, 11), False, "2.4.0"), "cerebras.pytorch, which is not installed"),
        (environment_problem((3, 11), True, "2.13.0+cpu"), "needs torch 2.4.0 exactly but torch 2.13.0+cpu"),
    ]:
        assert found in problem and fix in problem and problem.count(". ") == 0


def test_backend_cerebras_without_cstorch_fails_at_config_time(tmp_path: Path, cache_dir: Path) -> None:
    reason = CerebrasBackend.unavailable_reason()
    if reason is None:
        pytest.skip("cerebras.pytorch runs here; this checks the message when it does not")
    with pytest.raises(ConfigError, match=re.escape(reason)):
        make_config(tmp_path, cache_dir, "backend=cerebras")
    assert "make_cerebras_venv.sh" in reason


def test_algorithm_missing_from_their_version_is_refused() -> None:
    config = SparsityConfig(sparsity=0.75, algorithm="rigl", update={"freq": 10})
    check_algorithms(config, CSTORCH_VERSION, {"Static", "GMP", "SET", "RigL"})
    with pytest.raises(
        ConfigError,
        match=r"sparsity.algorithm: cerebras-pytorch 1.9.0 has no RigL: install 2.10.0.*"
        r"\(allowed: static, gmp\)",
    ):
        check_algorithms(config, "1.9.0", {"Static", "GMP"})


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (SparsityConfig(pattern=NMPattern(2, 4)), "sparsity.pattern"),
        (SparsityConfig(sparsity=0.75, distribution="erk"), "sparsity.distribution"),
    ],
)
def test_what_cstorch_lacks_is_refused_before_import(config: SparsityConfig, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: [^.]*: .*backend=masked_dense$"):
        CerebrasBackend.check_config(Config(sparsity=config, task=TrainConfig()), "cpu")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["backend=cerebras", "cluster=cs2"],
            r"cluster.mgmt_address: a CS-2 run needs cluster.mgmt_address=<host>:<port>",
        ),
        (["backend=masked_dense", "cluster=cs2"], r"cluster.target: CSX is a cstorch backend: use backend=cerebras"),
        (["cluster.mode=compile_only"], r"cluster.mode: compile_only lowers for a CS-2: it needs backend=cerebras"),
        (["backend=cerebras", "cluster=cs2", "cluster.mode=compile"], r"cluster.mode: unknown 'compile'"),
        (["backend=cerebras", "cluster=cs2", "cluster.mgmt_address=nohost"], r"cluster.mgmt_address: 'nohost' is not"),
        (["backend=cerebras", "cluster=cs2", "cluster.job_priority=p9"], r"cluster.job_priority: unknown 'p9'"),
        (["backend=cerebras", "cluster=cs2", 'cluster.job_labels=["a=b=c"]'], r"cluster.job_labels\[0\]: 'a=b=c'"),
        (
            ["backend=cerebras", "cluster=cs2", "cluster.mount_dirs=[/no/such/dir]"],
            r"cluster.mount_dirs\[0\]: /no/such",
        ),
        (
            ["backend=cerebras", "cluster=cs2", "cluster.credentials_path=/no/cert"],
            r"cluster.credentials_path: /no/cert",
        ),
        (
            ["backend=cerebras", "cluster=cs2", "cluster.mode=compile_only", "task.micro_batch_size=4"],
            r"a CS-2 splits batches",
        ),
        (
            ["backend=cerebras", "cluster=cs2", "cluster.mode=validate_only", "cluster.num_csx=3"],
            r"task.batch_size: 8 does not split over cluster.num_csx=3 CS-2s: use a multiple of 3",
        ),
        (
            ["backend=cerebras", "cluster=cs2", "cluster.mode=validate_only", "task.precision=fp32"],
            r"task.precision: fp32 on a CS-2 would run as float16 .* use task.precision=bf16",
        ),
        (["task.precision=cbf16"], r"task.precision: cbf16 is cstorch's mixed precision on a CS-2: use backend=cer"),
        (["backend=cerebras", "task.precision=fp16"], r"task.precision: fp16 is cstorch's .* task.precision=bf16"),
    ],
)
def test_cluster_config_is_validated_before_anything_runs(
    tmp_path: Path, cache_dir: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, cache_dir, *overrides)


def test_cs2_corpus_cache_must_be_on_a_mounted_volume(tmp_path: Path, cache_dir: Path) -> None:
    """The input workers read the corpus cache: on a CS-2 it must lie under `cluster.mount_dirs` (checked before
    anything runs; a training run needs mount dirs, a lowering run only when it names some)."""
    volume = tmp_path / "volume"
    volume.mkdir()
    cs2 = ["backend=cerebras", "cluster=cs2", "cluster.mode=compile_only", "task.micro_batch_size=8"]
    with pytest.raises(ConfigError, match=r"data.cache_dir: .* is not under cluster.mount_dirs=.*add its volume"):
        make_config(tmp_path / "run", cache_dir, *cs2, f"cluster.mount_dirs=[{volume}]")
    if CerebrasBackend.unavailable_reason() is None:  # the config is accepted (without cstorch it stops later)
        make_config(tmp_path / "run", volume / "cache", *cs2, f"cluster.mount_dirs=[{volume}]")
        make_config(tmp_path / "run", cache_dir, *cs2)

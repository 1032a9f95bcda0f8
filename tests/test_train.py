"""The pre-training loop end to end on the shipped PubMed sample: summary, export, exact resume, refusals."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modelzoo import checkpoint as ckpt
from modelzoo.errors import CheckpointError
from modelzoo.flops import flop_report
from modelzoo.tasks.pretrain import Pretraining, format_summary
from tests.conftest import killed_at_step, make_config, train_losses


def test_pretrain_summary_checkpoint_and_export(tmp_path: Path, cache_dir: Path) -> None:
    cfg = make_config(tmp_path / "run", cache_dir, "task.max_steps=6", "task.eval_every=3", "task.log_every=2")
    trainer = Pretraining(cfg)
    summary = trainer.fit()
    assert summary.steps == 6
    assert summary.tokens == 6 * 8 * 64
    assert summary.sparsity == pytest.approx(0.75, abs=1e-4)
    assert all(v == pytest.approx(0.75, abs=1e-3) for v in summary.sparsity_per_param.values())
    assert len(summary.sparsity_per_param) == 4 * 2
    assert math.isfinite(summary.val_loss)
    assert summary.dense_flops / summary.sparse_flops > 1.5
    assert summary.sparse_flops == summary.final_sparse_flops and summary.mask_sparsity == pytest.approx(0.75, abs=1e-4)
    assert [step for step, _ in train_losses(tmp_path / "run")] == ["2", "4", "6"]
    assert (tmp_path / "run" / "summary.json").is_file()
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_000006"

    hf = AutoModelForCausalLM.from_pretrained(summary.export_dir).eval()
    x = torch.from_numpy(trainer.corpus.validation[:2, :-1].astype("int64"))
    trainer.model.eval()
    with torch.no_grad():
        ours, _ = trainer.model(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_summary_charges_each_step_at_its_level_and_shows_mask_sparsity(tmp_path: Path, cache_dir: Path) -> None:
    """GMP to 75% along a cosine of 4 steps, updates at 0, 2 and 4 of a 6-step run: the masks hold 0%, 37.5% and
    75% for two steps each, 37.5% on average; then SET at 75% regrowing at its last step: the regrown
    connections are kept by the masks but still exactly zero, so more weights are zero than the masks prune."""
    gmp = ["sparsity=gmp_75", "sparsity.update.freq=2", "sparsity.sparsity.half_period=4", "sparsity.update.stop=5"]
    cfg = make_config(tmp_path / "gmp", cache_dir, *gmp, "task.max_steps=6", "task.export=false")
    summary = Pretraining(cfg).fit()
    assert summary.average_sparsity == pytest.approx(0.375, abs=1e-6)
    assert summary.sparsity == pytest.approx(0.75, abs=1e-3) and summary.mask_sparsity == pytest.approx(0.75, abs=1e-3)
    report = flop_report(cfg.model, cfg.data.seq_len, cfg.sparsity, steps=6)
    assert summary.sparse_flops == pytest.approx(report.sparse_per_token * summary.tokens)
    assert summary.dense_flops > summary.sparse_flops > summary.final_sparse_flops
    assert "masks 37.5% sparse on average; the final masks alone would give" in format_summary(summary)

    set_75 = ["sparsity=set_75", "sparsity.update.freq=2", "task.max_steps=4", "task.export=false"]
    summary = Pretraining(make_config(tmp_path / "set", cache_dir, *set_75)).fit()
    assert summary.mask_sparsity == pytest.approx(0.75, abs=1e-3) and summary.mask_sparsity < summary.sparsity
    assert f"are zero, masks prune {summary.mask_sparsity:.1%}" in format_summary(summary)


def test_dense_run_has_no_masks(tmp_path: Path, cache_dir: Path) -> None:
    cfg = make_config(tmp_path / "run", cache_dir, "sparsity=dense", "task.max_steps=2", "task.export=false")
    trainer = Pretraining(cfg)
    summary = trainer.fit()
    assert summary.sparsity is None
    assert summary.dense_flops == summary.sparse_flops
    assert not any(key.endswith("_mask") for key in trainer.model.state_dict())


# Masks update at steps 3 and 6: the crashed run below dies between the two and resumes across the second.
ALGORITHMS = {
    "static": [],
    "gmp": ["sparsity=gmp_75", "sparsity.update.freq=3", "sparsity.sparsity.half_period=8", "sparsity.update.stop=9"],
    "set": ["sparsity=set_75", "sparsity.update.freq=3"],
    "rigl": ["sparsity=rigl_75", "sparsity.update.freq=3"],
}


def masks_at(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    weights = load_file(ckpt.checkpoint_dir(run_dir) / f"step_{step:06d}" / ckpt.MODEL_FILE)
    return {k: v for k, v in weights.items() if k.endswith("_mask")}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_resume_after_crash_is_exact(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    steps = [
        "task.max_steps=8",
        "task.checkpoint_every=4",
        "task.log_every=1",
        "task.eval_every=4",
        "task.export=false",
        *ALGORITHMS[algorithm],
    ]
    Pretraining(make_config(tmp_path / "full", cache_dir, *steps)).fit()
    before, after = masks_at(tmp_path / "full", 4), masks_at(tmp_path / "full", 8)
    assert any(not torch.equal(v, after[k]) for k, v in before.items()) == (algorithm != "static")

    with killed_at_step(monkeypatch, 6):
        Pretraining(make_config(tmp_path / "crashed", cache_dir, *steps)).fit()
    assert ckpt.latest_checkpoint(tmp_path / "crashed").name == "step_000004"

    resumed = Pretraining(make_config(tmp_path / "crashed", cache_dir, *steps, "task.resume=true"))
    assert resumed.step == 4
    resumed.fit()
    assert train_losses(tmp_path / "crashed") == train_losses(tmp_path / "full")  # bit for bit
    full = ckpt.checkpoint_dir(tmp_path / "full") / "step_000008" / ckpt.MODEL_FILE
    again = ckpt.checkpoint_dir(tmp_path / "crashed") / "step_000008" / ckpt.MODEL_FILE
    assert full.read_bytes() == again.read_bytes()


def test_refuses_to_overwrite_and_to_resume_nothing(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        Pretraining(make_config(run, cache_dir, "task.resume=true"))
    Pretraining(make_config(run, cache_dir, "task.max_steps=1", "task.export=false")).fit()
    with pytest.raises(CheckpointError, match=r"task\.resume=true"):
        Pretraining(make_config(run, cache_dir, "task.max_steps=1"))


def test_resume_with_other_sparsity_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    Pretraining(make_config(run, cache_dir, "sparsity=dense", "task.max_steps=1", "task.export=false")).fit()
    with pytest.raises(
        CheckpointError, match=r"was trained with sparsity\.sparsity=None but the config has sparsity\.sparsity=0\.75;"
    ):
        Pretraining(make_config(run, cache_dir, "sparsity=static_75", "task.max_steps=2", "task.resume=true"))


# Matmuls over 4 and 8 sequences sum in different orders: after 2 steps the weights differ by up to 8.8e-7 on
# torch 2.13 and 2.4e-7 on torch 2.4 (CPU), far below any real difference in the update. The tied embedding / LM head
# is the exception on torch 2.4: rows of tokens absent from the batches get gradients of rounding size, which AdamW's
# normalisation turns into full-size steps, and there the two runs differ by up to 1.6e-5 (measured on the sharded
# corpus's batches; 8.8e-7 on torch 2.13).
ACCUMULATION_ATOL = 5e-6
EMBEDDING_ATOL = 5e-5
EMBEDDINGS = ("transformer.wte.weight", "lm_head.weight")


def atol(name: str) -> float:
    return EMBEDDING_ATOL if name in EMBEDDINGS else ACCUMULATION_ATOL


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path, cache_dir: Path) -> None:
    """8 sequences as 2 micro-batches of 4 give the same update as one micro-batch of 8 (same data order)."""
    common = ["task.max_steps=2", "task.export=false", "task.batch_size=8"]
    accumulated = Pretraining(make_config(tmp_path / "a", cache_dir, *common, "task.micro_batch_size=4"))
    single = Pretraining(make_config(tmp_path / "b", cache_dir, *common, "task.micro_batch_size=8"))
    assert accumulated.loop.accumulation == 2 and single.loop.accumulation == 1
    accumulated.fit()
    single.fit()
    for (name, a), b in zip(accumulated.model.state_dict().items(), single.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=atol(name)), name


def test_rigl_with_accumulation_matches_one_big_batch(tmp_path: Path, cache_dir: Path) -> None:
    """RigL regrows from the dense gradient accumulated over the micro-batches of a step: the masks after
    updates with accumulation 2 equal those with one micro-batch of the same 8 sequences."""
    common = [
        "task.max_steps=2",
        "task.export=false",
        "task.batch_size=8",
        "sparsity=rigl_75",
        "sparsity.update.freq=1",
    ]
    accumulated = Pretraining(make_config(tmp_path / "a", cache_dir, *common, "task.micro_batch_size=4"))
    single = Pretraining(make_config(tmp_path / "b", cache_dir, *common, "task.micro_batch_size=8"))
    initial = {k: v.clone() for k, v in single.model.state_dict().items() if k.endswith("_mask")}
    accumulated.fit()
    single.fit()
    final = single.model.state_dict()
    assert all(not torch.equal(final[k], v) for k, v in initial.items())  # masks moved at both steps
    for (name, a), b in zip(accumulated.model.state_dict().items(), final.values(), strict=True):
        if name.endswith("_mask"):
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a.float(), b.float(), atol=atol(name)), name


def test_nm_run_exports_its_pattern(tmp_path: Path, cache_dir: Path) -> None:
    trainer = Pretraining(make_config(tmp_path / "run", cache_dir, "sparsity=nm_2_4", "task.max_steps=2"))
    summary = trainer.fit()
    assert summary.sparsity == pytest.approx(0.5, abs=1e-4)
    sidecar = json.loads((Path(summary.export_dir) / "sparsity.json").read_text())
    assert (sidecar["pattern"], sidecar["algorithm"], sidecar["target_sparsity"]) == ("2:4", "static", 0.5)
    for sp in trainer.sparsifier.params:
        rows, cols = sp.param.shape
        assert torch.all((sp.param != 0).reshape(rows, cols // 4, 4).sum(-1) == 2), sp.name


def test_bf16_autocast_trains_and_keeps_masks(tmp_path: Path, cache_dir: Path) -> None:
    """The sparse matmuls run in bfloat16 (each block's MLP output is bf16 in the training and evaluation
    forwards, which it would not be if autocast did nothing) while the master weights stay float32."""
    trainer = Pretraining(make_config(tmp_path / "run", cache_dir, "task.precision=bf16", "task.max_steps=3"))
    dtypes: list[torch.dtype] = []
    trainer.model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    summary = trainer.fit()
    assert len(dtypes) > 3 and set(dtypes) == {torch.bfloat16}  # 3 steps x 2 micro-batches, then evaluation
    assert math.isfinite(summary.val_loss)
    assert summary.sparsity == pytest.approx(0.75, abs=1e-4)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, fp32 master weights


def test_bf16_autocast_with_rigl_updates_masks(tmp_path: Path, cache_dir: Path) -> None:
    overrides = [
        "task.precision=bf16",
        "task.max_steps=2",
        "task.export=false",
        "sparsity=rigl_75",
        "sparsity.update.freq=1",
    ]
    trainer = Pretraining(make_config(tmp_path / "run", cache_dir, *overrides))
    initial = [sp.mask.clone() for sp in trainer.sparsifier.params]
    trainer.fit()
    for sp, mask in zip(trainer.sparsifier.params, initial, strict=True):
        assert not torch.equal(sp.mask, mask)
        assert int(sp.mask.sum()) == int(mask.sum())  # 75% held
        assert torch.all(sp.param[~sp.mask] == 0) and sp.param.dtype == torch.float32


def test_training_time_leaves_out_evaluation_off_the_log_steps(tmp_path: Path, cache_dir: Path) -> None:
    """eval_every=3, log_every=2: the evaluation at step 3 falls inside the window that step 4 logs."""
    cfg = make_config(
        tmp_path / "run", cache_dir, "task.max_steps=4", "task.eval_every=3", "task.log_every=2", "task.export=false"
    )
    trainer = Pretraining(cfg)
    evaluate = trainer.loop.task.evaluate

    def slow_evaluate(step: int) -> dict[str, float]:
        if step == 3:
            time.sleep(3.0)  # an evaluation far longer than the 4 training steps (about 0.3 s)
        return evaluate(step)

    trainer.loop.task.evaluate = slow_evaluate
    started = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - started
    assert summary.seconds < wall - 3.0, f"{summary.seconds:.2f} s of training in {wall:.2f} s counted the evaluation"

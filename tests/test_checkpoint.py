"""Checkpoints: atomic writes, verification, and refusal of incomplete, corrupted or mismatched ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelzoo import checkpoint as ckpt
from modelzoo.config.train import OptimConfig
from modelzoo.distributed import Distributed
from modelzoo.errors import CheckpointError
from modelzoo.models.gpt import GPT
from modelzoo.optim import build_optimizer
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity


def sparse_setup(model: GPT) -> tuple[MaskedSparsity, torch.optim.Optimizer]:
    plugin = MaskedSparsity(SparsityConfig(sparsity=0.75), seed=0)
    plugin.apply(model)
    optimizer = build_optimizer(model, OptimConfig())
    plugin.apply_optimizer(optimizer)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(x, x)[1].backward()
    optimizer.step()
    return plugin, optimizer


def save(run_dir: Path, step: int, model: GPT, optimizer: torch.optim.Optimizer, keep: int = 2) -> Path:
    return ckpt.save_checkpoint(run_dir, step, model, optimizer.state_dict(), {"step": step}, "seed: 1\n", keep=keep)


def test_round_trip_restores_weights_masks_and_optimizer(tmp_path: Path, tiny_model: GPT, tiny_config) -> None:
    _, optimizer = sparse_setup(tiny_model)
    path = save(tmp_path, 5, tiny_model, optimizer)
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert ckpt.verify_checkpoint(path)["step"] == 5

    torch.manual_seed(123)
    fresh = GPT(tiny_config)
    fresh_plugin = MaskedSparsity(SparsityConfig(sparsity=0.75), seed=99)  # different masks until loaded
    fresh_plugin.apply(fresh)
    ckpt.load_model_weights(path, fresh, fresh_plugin.mask_names())
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    optimizer_state, trainer_state = ckpt.load_training_state(path)
    assert trainer_state == {"step": 5}
    assert optimizer_state["state"].keys() == optimizer.state_dict()["state"].keys()


def test_keeps_only_the_newest(tmp_path: Path, tiny_model: GPT) -> None:
    _, optimizer = sparse_setup(tiny_model)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, tiny_model, optimizer, keep=2)
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).glob("step_*")) == ["step_000003", "step_000004"]


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path: Path, tiny_model: GPT, monkeypatch) -> None:
    _, optimizer = sparse_setup(tiny_model)
    good = save(tmp_path, 1, tiny_model, optimizer)
    original_save = torch.save

    def crash_on_trainer_state(obj, path, *args, **kwargs):
        if Path(path).name == ckpt.TRAINER_FILE:
            raise OSError("disk full")
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_trainer_state)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, tiny_model, optimizer)
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert not (ckpt.checkpoint_dir(tmp_path) / "step_000002").exists()
    ckpt.verify_checkpoint(good)


def test_truncated_file_is_refused(tmp_path: Path, tiny_model: GPT) -> None:
    _, optimizer = sparse_setup(tiny_model)
    path = save(tmp_path, 1, tiny_model, optimizer)
    data = (path / ckpt.MODEL_FILE).read_bytes()
    (path / ckpt.MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        ckpt.verify_checkpoint(path)


def test_corrupted_file_is_refused(tmp_path: Path, tiny_model: GPT) -> None:
    _, optimizer = sparse_setup(tiny_model)
    path = save(tmp_path, 1, tiny_model, optimizer)
    data = bytearray((path / ckpt.OPTIMIZER_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / ckpt.OPTIMIZER_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is corrupted"):
        ckpt.verify_checkpoint(path)


def test_incomplete_checkpoint_without_manifest_is_refused(tmp_path: Path, tiny_model: GPT) -> None:
    _, optimizer = sparse_setup(tiny_model)
    path = save(tmp_path, 1, tiny_model, optimizer)
    (path / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        ckpt.verify_checkpoint(path)


def test_dense_checkpoint_refused_for_sparse_config(tmp_path: Path, tiny_model: GPT, tiny_config) -> None:
    optimizer = build_optimizer(tiny_model, OptimConfig())
    path = save(tmp_path, 1, tiny_model, optimizer)  # dense: no masks
    sparse = GPT(tiny_config)
    plugin = MaskedSparsity(SparsityConfig(sparsity=0.75), seed=0)
    plugin.apply(sparse)
    with pytest.raises(CheckpointError, match="has no masks"):
        ckpt.load_model_weights(path, sparse, plugin.mask_names())


def test_sparse_checkpoint_refused_for_dense_config(tmp_path: Path, tiny_model: GPT, tiny_config) -> None:
    _, optimizer = sparse_setup(tiny_model)
    path = save(tmp_path, 1, tiny_model, optimizer)
    with pytest.raises(CheckpointError, match="different sparsity config"):
        ckpt.load_model_weights(path, GPT(tiny_config), [])


def test_a_sharded_checkpoint_is_read_from_its_dcp_directory(tmp_path: Path, tiny_model: GPT) -> None:
    """A sharded checkpoint (`dcp/`, here written by one process) has no optimizer.pt: reading its training state as
    a whole checkpoint's is refused naming `dcp/` (it said "holds weights only"), and its weights are located there."""
    path = ckpt.save_checkpoint(tmp_path, 1, tiny_model, {}, {"step": 1}, "{}\n", keep=1, shards=Distributed())
    assert ckpt.weights_path(path) == path / ckpt.DCP_DIR
    whole = save(tmp_path / "whole", 1, tiny_model, torch.optim.AdamW(tiny_model.parameters()))
    assert ckpt.weights_path(whole) == whole / ckpt.MODEL_FILE
    with pytest.raises(CheckpointError, match=r"step_000001 is sharded \(task.parallelism=fsdp\): .* dcp/"):
        ckpt.load_training_state(path)

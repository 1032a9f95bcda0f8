"""The `modelzoo` command: info, flops, export, and HF import through task.init_from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelzoo.cli import main
from modelzoo.export.hf import load_hf
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.train.loop import TrainLoop
from tests.conftest import SMALL, make_config


def test_info_prints_the_papers_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    main(["info", "model=xl"])
    out = capsys.readouterr().out
    assert "1,208.0M" in out
    assert "96 tensors, 1,208.0M weights -> 302.0M nonzero" in out


def test_flops_prints_the_reduction(capsys: pytest.CaptureFixture[str]) -> None:
    main(["flops", "model=xl", "sparsity=static_75"])
    out = capsys.readouterr().out
    assert "2.49x fewer FLOPs\n" in out and "final" not in out
    main(["flops", "model=xl", "sparsity=gmp_75", "task.max_steps=400"])
    out = capsys.readouterr().out
    assert "over 400 steps, sparsity 45.9% on average, 75.0% at the end" in out
    assert "1.58x fewer FLOPs over the run (2.49x at the final level alone)" in out


def test_unknown_command_and_bad_override_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["flops", "sparsity.sparsity=2"])
    assert info.value.code == 2
    assert "sparsity.sparsity: 2" in capsys.readouterr().err


def test_export_command_and_init_from(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = cache_dir
    run = tmp_path / "run"
    trainer = Pretraining(make_config(run, cache, "task.max_steps=2", "task.export=false"))
    trainer.fit()
    main(["export", f"run_dir={run}", f"task.output_dir={tmp_path / 'hf'}"])
    assert "exported" in capsys.readouterr().out
    imported = load_hf(tmp_path / "hf")
    for name, masked in trainer.model.state_dict().items():
        if name.endswith("_mask"):
            continue
        mask = trainer.model.state_dict().get(name + "_mask")
        expected = masked * mask if mask is not None else masked
        assert torch.equal(imported.state_dict()[name], expected), name

    # continue training from the HF directory: same weights at step 0
    cont = Pretraining(make_config(tmp_path / "cont", cache, f"task.init_from={tmp_path / 'hf'}", "sparsity=dense"))
    assert all(torch.equal(cont.model.state_dict()[k], v) for k, v in imported.state_dict().items())


def test_unexpected_error_is_one_line_naming_the_log_with_the_traceback(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken_step(self: TrainLoop, *batch: torch.Tensor) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(TrainLoop, "train_step", broken_step)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run = tmp_path / "run"
    overrides = [*SMALL, f"run_dir={run}", f"data.cache_dir={cache_dir}", "task.max_steps=2"]
    with pytest.raises(SystemExit) as info:
        main(["pretrain", *overrides])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: unexpected RuntimeError: boom (the full traceback is in {run / 'pretrain.log'}; "
        "HYDRA_FULL_ERROR=1 prints it here)"
    )
    assert "Traceback" not in err
    assert "Traceback" in (run / "pretrain.log").read_text() and "second line" in (run / "pretrain.log").read_text()

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["pretrain", *overrides[:-1], f"run_dir={tmp_path / 'again'}", "task.max_steps=2"])

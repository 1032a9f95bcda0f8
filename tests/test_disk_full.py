"""A full disk: refused before writing (from the size about to be written) or, when a write fails with ENOSPC,
the same one-line error; no partial file stays and `latest` keeps naming the newest complete checkpoint.

The free space is emulated (fault injection): `shutil.disk_usage` reports a small disk, or the write itself raises
the error a full disk gives. The real thing, a 30 MB tmpfs, is in docs/testing.md.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from modelzoo import atomic, checkpoint
from modelzoo.cli import main
from modelzoo.errors import DiskFullError
from tests.conftest import SMALL


def full_disk(free: int):
    """A `shutil.disk_usage` that reports `free` bytes free."""

    def disk_usage(path: str) -> shutil._ntuple_diskusage:
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)

    return disk_usage


def _save(run: Path, step: int, model: torch.nn.Module) -> Path:
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long))[0].float().sum().backward()
    optimizer.step()
    return checkpoint.save_checkpoint(run, step, model, optimizer.state_dict(), {"step": step}, "a: 1\n", keep=3)


def _leftovers(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp-" in p.name]


def test_checkpoint_refused_before_writing_names_path_needed_and_free(
    tmp_path: Path, tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    first = _save(run, 1, tiny_model)
    monkeypatch.setattr(atomic.shutil, "disk_usage", full_disk(1_000_000))
    with pytest.raises(DiskFullError) as info:
        _save(run, 2, tiny_model)
    message = str(info.value)
    assert "step_000002" in message and "1,000,000 bytes" in message and "\n" not in message
    # the estimate covers what the checkpoint holds: at least the bytes the first one took
    assert info.value.needed >= sum(p.stat().st_size for p in first.iterdir())
    assert checkpoint.latest_checkpoint(run) == first and not (run / "checkpoints" / "step_000002").exists()
    assert not _leftovers(run)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8012224 vs 8012116"),
    ],
)
def test_enospc_during_a_checkpoint_write_is_one_line_and_leaves_nothing(
    tmp_path: Path, tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    run = tmp_path / "run"
    first = _save(run, 1, tiny_model)
    real_save = torch.save

    def full_disk_save(obj: object, file: Path) -> None:
        real_save(obj, file)  # the partial file a full disk leaves behind
        raise error

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_save)
    with pytest.raises(DiskFullError) as info:
        _save(run, 2, tiny_model)
    assert "step_000002" in str(info.value) and "needs" in str(info.value)
    assert checkpoint.latest_checkpoint(run) == first
    assert not _leftovers(run) and not (run / "checkpoints" / "step_000002").exists()


def test_other_write_errors_are_not_called_a_full_disk(
    tmp_path: Path, tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(obj: object, file: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(OSError) as info:
        _save(tmp_path / "run", 1, tiny_model)
    assert not isinstance(info.value, DiskFullError)


def test_pretrain_on_a_full_disk_exits_2_with_one_line(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A disk of 1.6 checkpoints: the second is refused, the run resumes once space is freed."""
    run = tmp_path / "run"
    overrides = [*SMALL, f"run_dir={run}", f"data.cache_dir={cache_dir}", "task.max_steps=4", "task.eval_every=2"]
    overrides += ["task.checkpoint_every=2", "task.export=false"]
    one_checkpoint = 0

    def disk_usage(path: str) -> shutil._ntuple_diskusage:
        used = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
        free = max(int(1.6 * one_checkpoint) - used, 0) if one_checkpoint else 10**12
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)

    real_save = checkpoint.save_checkpoint

    def measured_save(*args, **kwargs) -> Path:
        nonlocal one_checkpoint
        final = real_save(*args, **kwargs)
        one_checkpoint = one_checkpoint or sum(p.stat().st_size for p in final.iterdir())
        return final

    monkeypatch.setattr(atomic.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(checkpoint, "save_checkpoint", measured_save)
    with pytest.raises(SystemExit) as info:
        main(["pretrain", *overrides])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "step_000004: not enough disk space" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == err.strip().splitlines()[-1:]
    assert checkpoint.latest_checkpoint(run).name == "step_000002"
    monkeypatch.setattr(atomic.shutil, "disk_usage", full_disk(10**12))
    main(["pretrain", *overrides, "task.resume=true"])
    assert checkpoint.latest_checkpoint(run).name == "step_000004"

"""Every invalid config fails before any compute, naming the key and what is allowed."""

from __future__ import annotations

import sys

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from modelzoo.config import load_config, to_object
from modelzoo.errors import ConfigError
from modelzoo.validate import validate
from tests.conftest import run_command


def check(overrides: list[str]) -> None:
    validate(to_object(load_config(overrides)))


def test_default_config_is_valid() -> None:
    cfg = to_object(load_config([]))
    validate(cfg)
    assert cfg.model.name == "tiny"
    assert cfg.sparsity.sparsity == 0.75
    assert cfg.run_dir == "runs/tiny-static_75"


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["sparsity.sparsity=1.0"], "sparsity.sparsity", "outside [0, 1)"),
        (["sparsity.sparsity=-0.1"], "sparsity.sparsity", "outside [0, 1)"),
        (["sparsity.init_method=zeros"], "sparsity.init_method", "allowed: random, topk"),
        (["sparsity.algorithm=rigl2"], "sparsity.algorithm", "allowed: static"),
        (["sparsity.param_filter=[*nothing*]"], "sparsity.param_filter", "selects no parameter"),
        (["data.seq_len=512"], "data.seq_len", "model.n_positions=128"),
        (["task.batch_size=10", "task.micro_batch_size=4"], "task.batch_size", "not divisible"),
        (["task.precision=fp8"], "task.precision", "allowed: fp32, bf16, cbf16, fp16"),
        (["task.precision=fp16"], "task.precision", "use backend=cerebras cluster=cs2"),
        (["model.n_head=5"], "model.n_head", "not divisible"),
        (["optim.decay=step"], "optim.decay", "allowed: cosine, linear, constant"),
        (["task.max_steps=0"], "task.max_steps", "positive"),
    ],
)
def test_invalid_values_name_the_key(overrides: list[str], key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        check(overrides)
    assert info.value.key == key
    assert hint in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (["model=huge"], "Available options in 'model'"),
        (["sparsity=static_99"], "Available options in 'sparsity'"),
        (["backend=tpu"], "Available options in 'backend'"),
        (["model.n_layers=4"], "model.n_layers"),
        (["task.max_steps=ten"], "task.max_steps"),
    ],
)
def test_unknown_options_and_keys_fail_at_composition(overrides: list[str], hint: str) -> None:
    with pytest.raises((HydraException, OmegaConfBaseException, ConfigError)) as info:
        check(overrides)
    assert hint in str(info.value)


@pytest.mark.parametrize(("override", "key"), [("+sparsity.schedule=cosine", "sparsity.schedule"), ("+foo=1", "foo")])
def test_keys_added_with_plus_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        check([override])
    assert info.value.key == key
    assert "unknown key" in str(info.value)


def test_cli_refuses_bad_config_before_any_work(tmp_path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "modelzoo", "pretrain", f"run_dir={run_dir}", "sparsity.sparsity=1.5"]
    result = run_command(command, timeout=120, cwd=tmp_path)  # about 5 s: imports and config composition
    assert result.returncode == 2
    assert "sparsity.sparsity: 1.5 is outside [0, 1)" in result.stderr
    assert not run_dir.exists()  # refused before Hydra creates the run directory

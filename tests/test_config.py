"""Every invalid config fails before any compute, naming the key and what is allowed."""

from __future__ import annotations

import logging
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
        (["model.padded_vocab_multiple=0"], "model.padded_vocab_multiple", "positive"),
    ],
)
def test_invalid_values_name_the_key(overrides: list[str], key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        check(overrides)
    assert info.value.key == key
    assert hint in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "warnings"),
    [
        ([], []),  # the default run: warm-up 40 of 400 steps, static sparsity
        (
            ["task.max_steps=5", "sparsity=rigl_75"],
            [
                "optim.warmup_steps=40 is not below task.max_steps=5: the learning rate peaks at 12% of optim.lr and "
                "never decays; set optim.warmup_steps=0",
                "sparsity.update: rigl's first mask update comes at step 10, not within the run's 5 steps "
                "(task.max_steps), so its step-0 masks (75% sparse) never change; schedule one within steps 1-5 "
                "(sparsity.update.freq, .start or .steps) or set task.max_steps to at least 10",
            ],
        ),
        (["task.max_steps=40"], ["optim.warmup_steps=40 is not below task.max_steps=40: the learning rate reaches "
         "optim.lr at the end and never decays; set optim.warmup_steps=4"]),
        (["task.max_steps=5", "sparsity=gmp_75", "optim.warmup_steps=0"],
         ["gmp's first mask update comes at step 10, not within the run's 5 steps (task.max_steps), so it trains "
          "dense"]),
        (["task.max_steps=40", "sparsity=set_75", "optim.warmup_steps=4", "sparsity.update.freq=40"], []),
        (["task.max_steps=40", "sparsity=set_75", "optim.warmup_steps=4", "sparsity.update.freq=41"],
         ["sparsity.update: set's first mask update comes at step 41"]),
    ],
)  # fmt: skip
def test_a_run_too_short_for_its_schedules_is_warned_naming_the_keys(
    overrides: list[str], warnings: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A warm-up that does not end before the run, and dynamic sparsity whose first mask update comes after it,
    are accepted with a warning naming the keys and what would work (on main: accepted without a word)."""
    with caplog.at_level(logging.WARNING, logger="modelzoo.validate"):
        check(overrides)
    logged = [r.getMessage() for r in caplog.records if r.name == "modelzoo.validate"]
    assert len(logged) == len(warnings), logged
    for message, expected in zip(logged, warnings, strict=True):
        assert message.startswith("warning: ") and expected in message


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

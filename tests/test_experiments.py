"""Experiments (issue 18): the iso-FLOP budget, auto-resume, the experiment configs, baselines, the report's
aggregation, and a Hydra multirun sweep whose rerun skips what it finished."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from modelzoo.config import load_config, to_object
from modelzoo.config.experiment import StageConfig
from modelzoo.downstream.baselines import hoc_all_hallmarks, hoc_constant_k, hoc_tfidf_logreg
from modelzoo.downstream.hoc import HoCExample, load_hoc
from modelzoo.errors import ConfigError
from modelzoo.experiments.results import Run, cell, mean_std, results_table
from modelzoo.flops import flop_report, iso_flop_steps
from modelzoo.models.gpt import GPTConfig
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.train.budget import resolved
from modelzoo.validate import validate
from tests.conftest import (
    REPO,
    SHARED,
    SMALL,
    TRAINED_RUN,
    TRAINED_STEPS,
    copy_run,
    killed_at_step,
    make_config,
    needs_shared,
    run_command,
)

XL = GPTConfig(name="xl", n_layer=24, n_embd=2048, n_head=16, n_inner=8192, n_positions=2048, vocab_size=50257)
PAPERS = ("mediswift_med", "mediswift_large", "mediswift_xl", "spdf_gpt3_xl")


def _spent(config: GPTConfig, sparsity: SparsityConfig | None, steps: int) -> float:
    report = flop_report(config, 2048, sparsity, steps)
    return (report.sparse_per_token if sparsity else report.dense_per_token) * steps


@pytest.mark.parametrize("level", [0.5, 0.75])
def test_iso_flop_steps_are_the_fewest_that_spend_the_dense_budget(level: float) -> None:
    sparsity = SparsityConfig(sparsity=level)
    steps = iso_flop_steps(XL, 2048, sparsity, 1000)
    budget = _spent(XL, None, 1000)
    assert _spent(XL, sparsity, steps) >= budget > _spent(XL, sparsity, steps - 1)
    # SPDF's ratios for GPT-3 XL: about 1.67x at 50%, 2.5x at 75%.
    assert steps / 1000 == pytest.approx({0.5: 1.67, 0.75: 2.49}[level], abs=0.02)


def test_iso_flop_steps_of_dense_and_of_rigl() -> None:
    assert iso_flop_steps(XL, 2048, SparsityConfig(), 700) == 700
    rigl = to_object(load_config(["sparsity=rigl_75"])).sparsity
    static = SparsityConfig(sparsity=0.75)
    # RigL's dense gradients before each mask update cost FLOPs: its budget buys fewer steps than static's.
    assert iso_flop_steps(XL, 2048, rigl, 400) < iso_flop_steps(XL, 2048, static, 400)
    assert _spent(XL, rigl, iso_flop_steps(XL, 2048, rigl, 400)) >= _spent(XL, None, 400)


def test_budget_resolves_steps_and_records_them(tmp_path: Path, cache_dir: Path) -> None:
    cfg = make_config(tmp_path / "run", cache_dir, "sparsity=static_75", "task.budget=dense_flops", "task.max_steps=8")
    out = resolved(cfg)
    assert out.task.budget == "steps" and out.task.max_steps == iso_flop_steps(cfg.model, 64, cfg.sparsity, 8) > 8
    assert cfg.task.precision == "auto" and out.task.precision == "fp32"  # off a CS-2 the default stays fp32
    assert resolved(make_config(tmp_path / "d", cache_dir, "sparsity=dense", "task.budget=dense_flops")).task == (
        resolved(make_config(tmp_path / "d", cache_dir, "sparsity=dense")).task
    )
    with pytest.raises(ConfigError, match=r"task\.budget"):
        validate(to_object(load_config(["task.budget=flops"])))


def test_auto_resume_starts_continues_and_finds_finished(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    args = ("sparsity=static_75", "task.max_steps=6", "task.eval_every=3", "task.checkpoint_every=3")
    cfg = make_config(tmp_path / "run", cache_dir, *args, "task.auto_resume=true", "task.export=false")
    assert resolved(cfg).task.resume is False  # nothing to continue: a new run
    with killed_at_step(monkeypatch, 5):
        Pretraining(cfg).fit()
    assert resolved(cfg).task.resume is True
    summary = Pretraining(cfg).fit()
    assert summary.steps == 6
    reference = make_config(tmp_path / "ref", cache_dir, *args, "task.export=false")
    assert Pretraining(reference).fit().val_loss == summary.val_loss  # the continued run equals an uninterrupted one
    before = (tmp_path / "run" / "summary.json").read_text()
    assert Pretraining(cfg).fit().steps == 6  # finished: nothing trains, nothing changes
    assert (tmp_path / "run" / "summary.json").read_text() == before


def test_an_invalid_stage_is_refused_before_pretraining() -> None:
    cfg = to_object(load_config(["experiment=spdf_tiny"]))
    cfg.experiment.stages[1].dataset = "bioasq"
    with pytest.raises(ConfigError, match=r"experiment\.stages\[1\]\.dataset.*unknown 'bioasq'"):
        validate(cfg)
    cfg.experiment.stages[1].dataset, cfg.experiment.stages[2].max_steps = "hoc", 0
    with pytest.raises(ConfigError, match=r"experiment\.stages\[2\]\.max_steps: must be positive"):
        validate(cfg)


@pytest.mark.parametrize("name", ["spdf_tiny", *PAPERS])
def test_experiments_compose_and_validate(name: str) -> None:
    cfg = to_object(load_config([f"experiment={name}"]))
    validate(cfg)
    assert cfg.experiment.name == name and cfg.run_dir.startswith(f"runs/{name}/steps/")


def test_paper_experiments_train_what_the_papers_state() -> None:
    """Context 2048, GPT-3's batch, learning rate and the MediSwift token budget (104.86e9 tokens)."""
    for name, batch, lr in (
        ("mediswift_med", 256, 3e-4),
        ("mediswift_large", 256, 2.5e-4),
        ("mediswift_xl", 512, 2e-4),
    ):
        cfg = to_object(load_config([f"experiment={name}", "sparsity=static_75"]))
        assert (cfg.data.seq_len, cfg.task.batch_size, cfg.optim.lr) == (2048, batch, lr)
        assert cfg.task.max_steps * batch * 2048 == pytest.approx(104.86e9, rel=1e-3)
        assert cfg.tokenizer.name == "gpt2" and cfg.model.name == name.split("_")[1]
    spdf = to_object(load_config(["experiment=spdf_gpt3_xl"]))
    assert spdf.sparsity.sparsity == 0.75 and spdf.model.name == "xl"


def test_flops_command_of_an_experiment() -> None:
    out = run_command([sys.executable, "-m", "modelzoo", "flops", "experiment=spdf_gpt3_xl"], timeout=240, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "2.49x fewer FLOPs" in out.stdout and "model=xl seq_len=2048" in out.stdout


def _hoc(labels: list[set[int]], text: str = "t") -> list[HoCExample]:
    return [HoCExample(str(i), f"{text} {i}", frozenset(ls)) for i, ls in enumerate(labels)]


def test_constant_k_and_all_hallmarks_by_hand() -> None:
    train = _hoc([{0}, {0, 1}, {0, 1, 2}])  # frequencies 0 > 1 > 2
    dev = _hoc([{0, 1}, {0, 1}])  # k = 2 is exact on dev
    test = _hoc([{0}, {2}])  # predicting {0, 1} twice: tp 1, fp 3, fn 1
    constant = hoc_constant_k(train, dev, test)
    assert constant.detail.startswith("the 2 most") and constant.dev == 1.0
    assert constant.test == pytest.approx(2 * 1 / (2 * 1 + 3 + 1))
    assert hoc_all_hallmarks(dev, test).test == pytest.approx(2 * 2 / (2 * 2 + 18))


@needs_shared
def test_baselines_on_the_real_hoc_split() -> None:
    data = SHARED / "data" / "hoc"
    train, dev, test = (load_hoc(data, s) for s in ("train", "dev", "test"))
    constant = hoc_constant_k(train, dev, test)
    assert constant.test == pytest.approx(0.3118, abs=1e-4)  # docs/recipes.md's constant-k number
    tfidf = hoc_tfidf_logreg(train, dev, test)
    assert tfidf.test > constant.test + 0.2  # a small text classifier learns from the abstracts


def _run(budget: str, sparsity: str, seed: int, val_loss: float, hoc: float | None) -> Run:
    summary = {"steps": 10, "sparse_flops": 1e12 if sparsity == "dense" else 5e11, "val_loss": val_loss,
               "val_ppl": math.exp(val_loss)}  # fmt: skip
    stages = {"finetune-hoc-dense": {"test": {"f1": hoc}}} if hoc is not None else {}
    return Run(budget, sparsity, seed, Path(f"r{seed}"), summary, stages)


def test_results_table_aggregates_seeds() -> None:
    stage = StageConfig(task="finetune", dataset="hoc", sparsity="dense")
    runs = [_run("steps", "dense", s, 5.0 + s / 10, 0.3 + s / 100) for s in (1, 2, 3)]
    runs += [_run("steps", "static_75", s, 5.5, 0.4 if s < 3 else None) for s in (1, 2, 3)]
    runs.append(Run("steps", "static_50", 1, Path("x")))  # not finished: left out
    table = results_table(runs, [stage]).splitlines()
    assert len(table) == 4  # header, rule, dense, static_75
    assert "| 5.2000 ± 0.1000 (3) |" in table[2] and "| 0.320 ± 0.010 (3) |" in table[2]
    assert "| 2.00x |" in table[3] and "| 0.400 ± 0.000 (2) |" in table[3]
    assert mean_std([1.0, 2.0, 4.0]) == (statistics.fmean([1, 2, 4]), statistics.stdev([1, 2, 4]))
    assert cell([]) == "-" and cell([0.5], percent=True) == "50.0% ± 0.0 (1)"


@pytest.mark.slow
def test_multirun_sweep_trains_each_job_in_its_dir_and_a_rerun_skips_them(tmp_path: Path) -> None:
    """`modelzoo pretrain -m experiment=spdf_tiny ...` on the shipped sample: one run dir per sparsity and seed,
    its iso-FLOP twin longer; the same command again trains nothing."""
    common = ["data=pubmed_sample", "task.max_steps=4", "task.eval_every=2", "task.checkpoint_every=2",
              "task.eval_batches=2", "task.export=false", f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    command = [sys.executable, "-m", "modelzoo", "pretrain", "-m", "experiment=spdf_tiny", *common]
    out = run_command([*command, "sparsity=dense,static_75", "seed=1,2"], timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = tmp_path / "runs" / "spdf_tiny"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("steps/*/summary.json")}
    assert sorted(summaries) == ["dense-seed1", "dense-seed2", "static_75-seed1", "static_75-seed2"]
    assert summaries["dense-seed1"]["val_loss"] != summaries["dense-seed2"]["val_loss"]  # the seeds differ
    iso = run_command([*command, "task.budget=dense_flops", "sparsity=static_75", "seed=1"], timeout=900, cwd=tmp_path)
    assert iso.returncode == 0, iso.stderr[-3000:]
    longer = json.loads((runs / "dense_flops" / "static_75-seed1" / "summary.json").read_text())
    assert longer["steps"] > 4 and longer["sparse_flops"] >= summaries["dense-seed1"]["sparse_flops"]
    again = run_command([*command, "sparsity=dense,static_75", "seed=1,2"], timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already finished") == 4  # Hydra logs a multirun's jobs to stdout


def test_multirun_skips_a_job_whose_run_exists_and_goes_on(tmp_path: Path, trained_run: Path, cache_dir: Path) -> None:
    """A sweep whose first job would start over an existing run skips it, saying so, and runs the next, which
    continues that run with task.auto_resume=true (on main the first job's refusal ended the whole sweep, exit 2)."""
    run = copy_run(trained_run, tmp_path)
    before = json.loads((run / "summary.json").read_text())
    overrides = [*SMALL, *TRAINED_RUN, f"run_dir={run}", f"data.cache_dir={cache_dir}", "task.export=false"]
    more = f"task.max_steps={TRAINED_STEPS + 1}"
    command = [sys.executable, "-m", "modelzoo", "pretrain", "-m", *overrides, more, "task.auto_resume=false,true"]
    out = run_command(command, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr  # Hydra logs a multirun's jobs to stdout
    assert re.search(rf"multirun job 0 skipped: {re.escape(str(run))} already holds checkpoint step_000004", log), log
    assert "task.auto_resume=true continues it" in log
    after = json.loads((run / "summary.json").read_text())
    assert (before["steps"], after["steps"]) == (TRAINED_STEPS, TRAINED_STEPS + 1)  # job 1 resumed it


def test_reproduce_report_only_runs_on_no_runs(tmp_path: Path) -> None:
    """The driver's report path works before anything ran (every cell empty)."""
    results = tmp_path / "results.md"
    results.write_text("# Results\n\nhand-written text\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce.py"), "--report-only", f"--results={results}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = results.read_text()
    assert "hand-written text" in text and "scripts/reproduce.py: begin" in text and "| hoc |" not in text

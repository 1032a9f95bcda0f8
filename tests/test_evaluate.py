"""`modelzoo evaluate`: config errors, checkpoint / export / transformers agreement, FLOPs, written results."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from modelzoo.cli import main
from modelzoo.config import load_config, to_object
from modelzoo.downstream.evaluate import (
    PubMedQAResult,
    evaluate_pubmedqa,
    hf_logits,
    load_model,
    macro_f1,
)
from modelzoo.downstream.lm_eval_parity import compare, lm_eval_scores
from modelzoo.downstream.pubmedqa import load_pubmedqa
from modelzoo.downstream.results import write_results
from modelzoo.errors import ConfigError
from modelzoo.tasks.evaluate import run
from modelzoo.validate import validate
from tests.conftest import TRAINED_STEPS, needs_shared
from tests.test_downstream_data import PQA

LIMIT = 12


def evaluate_config(run_dir: Path, *overrides: str):
    return to_object(
        load_config(
            ["task=evaluate", f"run_dir={run_dir}", f"task.pubmedqa_data={PQA}", "task.progress=false", *overrides]
        )
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("task.tasks=[mmlu]", "task.tasks"),
        ("task.split=validation", "task.split"),
        ("task.batch_size=0", "task.batch_size"),
        ("task.limit=-1", "task.limit"),
        ("task.precision=fp8", "task.precision"),
        ("task.hf_dirs=[/nonexistent]", "task.hf_dirs"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate(evaluate_config(tmp_path, override))


def test_hf_dir_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.hf_dirs: .* has no config\.json"):
        validate(evaluate_config(tmp_path, f"task.hf_dirs=[{tmp_path}]"))


def test_hf_dir_that_is_no_causal_lm_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2ForSequenceClassification"]}))
    with pytest.raises(ConfigError, match=r"task\.hf_dirs: .* GPT2ForSequenceClassification .* not a causal LM"):
        validate(evaluate_config(tmp_path, f"task.hf_dirs=[{tmp_path}]"))


def test_macro_f1() -> None:
    assert macro_f1([0, 0, 1, 2], [0, 0, 1, 2]) == 1.0
    # yes: TP 2, FN 1 -> 0.8; no: TP 0 (FP 1) -> 0; maybe: TP 1 -> 1.
    assert macro_f1([0, 0, 0, 2], [0, 0, 1, 2]) == pytest.approx((0.8 + 0 + 1) / 3)


def assert_same_answers(reference: PubMedQAResult, *others: PubMedQAResult) -> None:
    """Every question answered alike, each choice's log-likelihood within 1e-4."""
    for other in others:
        for a, b in zip(reference.questions, other.questions, strict=True):
            assert a["predicted"] == b["predicted"]
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


@needs_shared
def test_checkpoint_export_and_transformers_agree(trained_run: Path, tmp_path: Path) -> None:
    cfg = evaluate_config(trained_run, f"task.limit={LIMIT}")
    examples = load_pubmedqa(PQA, "test")[:LIMIT]
    from_checkpoint = evaluate_pubmedqa(
        load_model(str(trained_run), cfg, "task.checkpoints"), examples, "test", progress=False
    )
    exported = load_model(str(trained_run / "hf"), cfg, "task.hf_dirs")
    from_export = evaluate_pubmedqa(exported, examples, "test", progress=False)
    exported.logits_fn = hf_logits(AutoModelForCausalLM.from_pretrained(trained_run / "hf").eval())
    through_transformers = evaluate_pubmedqa(exported, examples, "test", batch_size=5, progress=False)
    assert_same_answers(from_checkpoint, from_export, through_transformers)
    # The FLOPs of the checkpoint (from its config and step) equal the run's summary, also for the export.
    summary = json.loads((trained_run / "summary.json").read_text())
    assert from_checkpoint.train_flops == pytest.approx(summary["sparse_flops"])
    assert from_export.dense_train_flops == pytest.approx(summary["dense_flops"])
    assert from_checkpoint.step == from_export.step == TRAINED_STEPS
    assert from_checkpoint.baseline_accuracy == sum(e.label == "yes" for e in examples) / LIMIT
    accuracy = sum(q["predicted"] == q["label"] for q in from_checkpoint.questions) / LIMIT
    assert from_checkpoint.accuracy == accuracy


@needs_shared
def test_cli_writes_table_json_plot(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    main(
        [
            "evaluate",
            f"run_dir={trained_run}",
            f"task.checkpoints=[{trained_run}]",
            f"task.hf_dirs=[{trained_run / 'hf'}]",
            f"task.pubmedqa_data={PQA}",
            f"task.limit={LIMIT}",
            "task.progress=false",
            f"task.output_dir={out}",
        ]
    )
    printed = capsys.readouterr().out
    assert "majority-class baseline: always 'yes'" in printed and f"| run/hf | hf (ours) | {TRAINED_STEPS} |" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["kind"] for r in results] == ["checkpoint", "hf (ours)"] and results[0]["n"] == LIMIT
    assert (out / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    predictions = [json.loads(line) for line in (out / "predictions" / "0-run.jsonl").open()]
    assert len(predictions) == LIMIT and set(predictions[0]["scores"]) == {"yes", "no", "maybe"}


@needs_shared
def test_limit_draws_every_label_not_the_first_n_of_the_sorted_file(
    trained_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The test file holds 276 "yes" first: a limit of 50 must score about 28 yes, 17 no and 5 maybe."""
    caplog.set_level(logging.INFO)
    (result,) = run(evaluate_config(trained_run, "task.limit=50"))
    labels = Counter(q["label"] for q in result.questions)
    assert labels == {"yes": 28, "no": 17, "maybe": 5} and result.n == 50
    assert "task.limit=50: a stratified random sample (seed 0) of the 500 PubMedQA test questions" in caplog.text
    assert result.baseline_accuracy == 28 / 50


@needs_shared
def test_run_defaults_to_latest_checkpoint_of_run_dir(trained_run: Path, tmp_path: Path) -> None:
    (result,) = run(evaluate_config(trained_run, "task.limit=3"))
    assert result.kind == "checkpoint" and result.source.endswith(f"step_{TRAINED_STEPS:06d}") and result.n == 3
    written = write_results([result], tmp_path)
    assert "plot" in written  # FLOPs are known, so the plot is drawn


@needs_shared
@pytest.mark.slow
def test_accuracy_equals_lm_eval_harness(trained_run: Path, tmp_path: Path) -> None:
    """lm-eval's `pubmedqa` task (the local copy reading our JSONL files) on the export gives our log-likelihoods."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    yaml = (PQA / "lm_eval" / "pubmedqa_local.yaml").read_text()
    (task_dir / "pubmedqa_local.yaml").write_text(yaml.replace("../shared/data/pubmedqa/", f"{PQA}/"))
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={trained_run / 'hf'},dtype=float32",
        tasks=["pubmedqa_local"],
        task_manager=TaskManager(include_path=str(task_dir)),
        device="cpu",
        batch_size=4,
        limit=LIMIT,
        log_samples=True,
    )
    theirs = lm_eval_scores(enumerate(out["samples"]["pubmedqa_local"], start=1))
    limited = (f"task.limit={LIMIT}", "task.limit_first=true")  # lm-eval's --limit takes the first N
    (ours,) = run(evaluate_config(trained_run, *limited, f"task.checkpoints=[{trained_run}]"))
    parity = compare(ours.questions, theirs)
    assert parity.n == LIMIT and parity.same_predictions == LIMIT
    assert parity.max_abs_diff < 1e-4
    assert ours.accuracy == parity.their_accuracy == out["results"]["pubmedqa_local"]["acc,none"]

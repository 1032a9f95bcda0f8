"""Fine-tuning and soft prompting from a sparse pre-trained tiny run, on the real PubMedQA and HoC files."""

from __future__ import annotations

import importlib
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2LMHeadModel

from modelzoo.checkpoint import CONFIG_FILE, MODEL_FILE, checkpoint_masks, latest_checkpoint, selected_checkpoint
from modelzoo.config import load_config, to_object
from modelzoo.config.finetune import FinetuneConfig, output_dir
from modelzoo.downstream.evaluate import load_model, macro_f1
from modelzoo.downstream.pubmedqa import CHOICES, DIR_FILES, load_pubmedqa, pubmedqa_prompt
from modelzoo.downstream.sampling import stratified_sample
from modelzoo.downstream.scoring import choice_loglikelihoods
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.export.seq_cls import export_seq_cls
from modelzoo.models.classifier import Classifier
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.tasks.finetune import FinetuneSummary, run
from modelzoo.validate import validate
from tests.conftest import REPO, SHARED, killed_at_step, needs_shared, run_command, train_losses

# A few steps of everything: enough to move weights, small enough for 2 cores.
FAST = [
    "task.limit=24",
    "task.max_steps=3",
    "task.eval_every=3",
    "task.batch_size=4",
    "task.micro_batch_size=4",
    "task.seq_len=48",
]


@pytest.fixture
def pretrained(trained_run: Path) -> Path:
    """The pre-trained run fine-tuned here: conftest's shared `trained_run` (the tiny 75% static-sparse run of
    4 steps), read only (every fine-tuning writes to its own task.output_dir)."""
    return trained_run


def adapt(task: str, pretrained: Path, out: Path, *overrides: str) -> FinetuneSummary:
    data = SHARED / "data"
    dataset = next((o.split("=")[1] for o in overrides if o.startswith("task.dataset=")), "pubmedqa")
    cfg = to_object(
        load_config(
            [f"task={task}", f"task.pretrained={pretrained}", f"task.output_dir={out}",
             f"task.data_dir={data / dataset}", *FAST, *overrides]
        )
    )  # fmt: skip
    validate(cfg)
    return run(cfg)


def evaluate_checkpoint(run_dir: Path):
    cfg = to_object(load_config(["task=evaluate", "backend=masked_dense", "task.device=cpu", f"run_dir={run_dir}"]))
    return load_model(str(run_dir), cfg, "task.checkpoints")


def masked_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    path = latest_checkpoint(run_dir)
    return load_file(str(path / MODEL_FILE)), checkpoint_masks(path)


def shuffled_pubmedqa(directory: Path) -> Path:
    """The PubMedQA files in a fixed random order: the shipped ones are sorted by label (the first 276 test answers
    are all "yes"), so their first `task.limit=24` questions would hold one class only."""
    for name in DIR_FILES.values():
        lines = (SHARED / "data" / "pubmedqa" / name).read_text().rstrip("\n").split("\n")  # records hold U+2028
        random.Random(0).shuffle(lines)
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory


def exported_test_scores(hf_dir: str, data_dir: Path) -> dict[str, float]:
    """PubMedQA test accuracy and macro-F1 (the `task.limit=24` questions sampled, in the 48-token window FAST sets)
    of the exported Hugging Face model, scored through `transformers` and counted here: what the summary must
    report for the model it exported, on the test split."""
    model, tokenizer = GPT2LMHeadModel.from_pretrained(hf_dir).eval(), AutoTokenizer.from_pretrained(hf_dir)
    questions = stratified_sample(load_pubmedqa(data_dir, "test"), 24, lambda e: e.label, "test questions")
    assert len({q.label for q in questions}) == 3  # every class, so that the counts pin the split
    with torch.no_grad():
        scores = choice_loglikelihoods(
            lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits,
            tokenizer,
            [pubmedqa_prompt(q) for q in questions],
            CHOICES,
            progress=False,
            max_length=48,
        )
    predicted, gold = scores.argmax(-1).tolist(), [q.label_index for q in questions]
    correct = sum(p == g for p, g in zip(predicted, gold, strict=True))
    return {"accuracy": correct / len(gold), "macro_f1": pytest.approx(macro_f1(gold, predicted), abs=1e-12)}


@needs_shared
def test_dense_finetuning_unfreezes_pruned_weights(pretrained: Path, tmp_path: Path) -> None:
    data = shuffled_pubmedqa(tmp_path)
    summary = adapt("finetune", pretrained, tmp_path / "ft", "task.sparsity=dense", f"task.data_dir={data}")
    weights, masks = masked_weights(tmp_path / "ft")
    _, pre_masks = masked_weights(pretrained)
    assert not masks and pre_masks  # the masks were dropped
    for key, mask in pre_masks.items():
        pruned = weights[key.removesuffix("_mask")][~mask]
        assert (pruned != 0).float().mean() > 0.5, key  # pruned entries learned again
    assert summary.nonzero_fraction > 0.5
    assert summary.test == exported_test_scores(summary.exports["hf"], data)
    assert GPT2LMHeadModel.from_pretrained(summary.exports["hf"]).config.n_positions == 64
    # `modelzoo evaluate` counts the pre-training up to the checkpoint used plus every fine-tuning step.
    evaluated, pre_summary = evaluate_checkpoint(tmp_path / "ft"), json.loads((pretrained / "summary.json").read_text())
    assert evaluated.train_flops == pytest.approx(pre_summary["sparse_flops"] + summary.finetune_flops)
    assert evaluated.dense_train_flops == pytest.approx(pre_summary["dense_flops"] + summary.finetune_dense_flops)


@needs_shared
def test_keep_holds_the_masks(pretrained: Path, tmp_path: Path) -> None:
    summary = adapt("finetune", pretrained, tmp_path / "ft", "task.sparsity=keep", "task.dataset=hoc")
    weights, masks = masked_weights(tmp_path / "ft")
    pre_weights, pre_masks = masked_weights(pretrained)
    assert masks.keys() == {f"backbone.{key}" for key in pre_masks}  # the classifier holds the backbone
    for key, mask in pre_masks.items():
        name = key.removesuffix("_mask")
        assert torch.equal(masks[f"backbone.{key}"], mask)
        assert torch.all(weights[f"backbone.{name}"][~mask] == 0), name
        assert not torch.equal(weights[f"backbone.{name}"], pre_weights[name])  # the kept weights trained
    assert summary.nonzero_fraction == 0.0
    assert set(summary.test) == {"f1", "macro_f1", "threshold"}


@needs_shared
@pytest.mark.parametrize("dataset", ["pubmedqa", "hoc"])
def test_prompt_tuning_changes_only_the_prompt(pretrained: Path, tmp_path: Path, dataset: str) -> None:
    extra = ["task.num_virtual_tokens=8", "task.init=text", f"task.dataset={dataset}"]
    summary = adapt("prompt_tune", pretrained, tmp_path / "pt", *extra)
    weights, _ = masked_weights(tmp_path / "pt")
    pre_weights, _ = masked_weights(pretrained)
    for name, value in pre_weights.items():
        if not name.endswith("_mask"):
            assert torch.equal(weights[f"backbone.{name}"], value), name
    trained = {"prompt.embedding"} | ({"score.weight"} if dataset == "hoc" else set())
    assert {k for k in weights if not k.startswith("backbone.")} == trained
    assert summary.trainable_params == 8 * 64 + (10 * 64 if dataset == "hoc" else 0)
    assert {p.name for p in Path(summary.exports["adapter"]).iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    with pytest.raises(CheckpointError, match="not a causal LM"):
        evaluate_checkpoint(tmp_path / "pt")  # a soft prompt or a classifier is no checkpoint `evaluate` scores


def test_default_output_dir_is_beside_never_inside_a_checkpoint(tmp_path: Path) -> None:
    step = tmp_path / "run" / "checkpoints" / "step_000100"
    step.mkdir(parents=True)
    (step / CONFIG_FILE).write_text("")
    assert output_dir(FinetuneConfig(pretrained=str(tmp_path / "run"))) == tmp_path / "run" / "finetune-pubmedqa-dense"
    assert output_dir(FinetuneConfig(pretrained=str(step))) == tmp_path / "run" / "finetune-pubmedqa-dense-step_000100"
    assert output_dir(FinetuneConfig(pretrained=str(step), output_dir="out")) == Path("out")


def test_sequence_classification_export_parity(tiny_model: GPT, tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = Classifier(tiny_model, 10, pad_token_id=0).eval()
    export_seq_cls(classifier, tmp_path / "hf", [f"h{i}" for i in range(10)])
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == "GPT2ForSequenceClassification"
    assert hf_model.config.problem_type == "multi_label_classification" and hf_model.config.pad_token_id == 0
    ids = torch.randint(1, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    ids[0, 12:], ids[1, 5:] = 0, 0  # right padding of different lengths
    with torch.no_grad():
        torch.testing.assert_close(classifier(ids), hf_model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


@needs_shared
def test_config_errors_name_the_key(pretrained: Path) -> None:
    def check(key: str, *overrides: str) -> None:
        cfg = to_object(load_config([f"task.pretrained={pretrained}", *overrides]))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(cfg)

    # n_positions is 64: 60 virtual tokens leave no room for 48 tokens of text.
    check("task.num_virtual_tokens", "task=prompt_tune", "task.num_virtual_tokens=60", "task.seq_len=48")
    check("task.num_virtual_tokens", "task=prompt_tune", "task.num_virtual_tokens=64")
    check("task.seq_len", "task=finetune", "task.seq_len=65")
    check("task.sparsity", "task=finetune", "task.sparsity=sparse")
    check("task.dataset", "task=finetune", "task.dataset=medqa")
    check("task.init", "task=prompt_tune", "task.init=zeros")
    check("task.limit", "task=finetune", "task.limit=-1")
    check("task.pretrained", "task=finetune", "task.pretrained=/nonexistent/run")
    check("backend.name", "task=finetune", "backend=cerebras")  # fine-tuning runs on masked_dense, said by name
    check("backend.name", "task=prompt_tune", "backend.name=torch_sparse")


def test_finetune_benchmark_times_every_variant(tiny_config: GPTConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    bench = importlib.import_module("finetune")
    shape = bench.Shape(tiny_config, batch=2, seq=bench.VIRTUAL + 8, steps=1)
    timings = bench.measure(shape, steps=1, warmup=0, repeats=1)
    assert set(timings) == {f"{task}/{impl}" for task in bench.TASKS for impl in ("ours", "hf")}
    assert "PubMedQA soft prompting" in bench.report("test", shape, timings, 1)


RESUMABLE = ["task.max_steps=6", "task.eval_every=2", "task.log_every=1", "task.micro_batch_size=2"]


@needs_shared
@pytest.mark.parametrize("dataset", ["pubmedqa", "hoc"])
def test_killed_finetuning_resumes_exactly(pretrained: Path, tmp_path: Path, monkeypatch, dataset: str) -> None:
    """A fine-tuning run killed after step 4's checkpoint and resumed equals the uninterrupted run bit for bit:
    losses, best step, final weights (data position, model selection and RNG state come back)."""
    extra = [*RESUMABLE, f"task.dataset={dataset}", "task.export=false"]
    full = adapt("finetune", pretrained, tmp_path / "full", *extra)

    with killed_at_step(monkeypatch, 5):
        adapt("finetune", pretrained, tmp_path / "crashed", *extra)
    assert latest_checkpoint(tmp_path / "crashed").name == "step_000004"
    resumed = adapt("finetune", pretrained, tmp_path / "crashed", *extra, "task.resume=true")
    assert train_losses(tmp_path / "crashed") == train_losses(tmp_path / "full")
    assert (resumed.best_step, resumed.dev, resumed.test) == (full.best_step, full.dev, full.test)
    assert resumed.finetune_flops == full.finetune_flops  # the tokens counted before the kill are kept
    last = Path("checkpoints") / "step_000006" / MODEL_FILE
    assert (tmp_path / "crashed" / last).read_bytes() == (tmp_path / "full" / last).read_bytes()


@needs_shared
def test_best_dev_checkpoint_is_kept_and_marked(pretrained: Path, tmp_path: Path) -> None:
    """Checkpoints at every evaluation, rotation keeps the newest and the best; `selected_checkpoint` is the best."""
    summary = adapt("finetune", pretrained, tmp_path / "ft", *RESUMABLE, "task.export=false")
    kept = sorted(p.name for p in (tmp_path / "ft" / "checkpoints").glob("step_*"))
    assert kept == sorted({"step_000006", f"step_{summary.best_step:06d}"})
    assert selected_checkpoint(tmp_path / "ft").name == f"step_{summary.best_step:06d}" == Path(summary.checkpoint).name
    assert latest_checkpoint(tmp_path / "ft").name == "step_000006"


@needs_shared
@pytest.mark.distributed
def test_two_ranks_finetune_like_one_process(pretrained: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU ranks fine-tunes to the losses of 1 process on the same global batch."""
    data = SHARED / "data" / "pubmedqa"
    overrides = [f"task.pretrained={pretrained}", f"task.data_dir={data}", *FAST[:2], *RESUMABLE, "task.export=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", []), ("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        command = [
            sys.executable,
            *launcher,
            "-m",
            "modelzoo",
            "finetune",
            *overrides,
            f"task.output_dir={tmp_path / name}",
        ]
        done = run_command(command, timeout=600, env=env)  # the whole process group is killed past it
        assert done.returncode == 0, done.stderr[-3000:]
    one, ddp = train_losses(tmp_path / "one"), train_losses(tmp_path / "ddp")
    assert [step for step, _ in ddp] == [str(s) for s in range(1, 7)]
    for (_, a), (_, b) in zip(one, ddp, strict=True):
        assert float(a) == pytest.approx(float(b), abs=1e-5)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "ddp")]
    assert summaries[0]["finetune_flops"] == summaries[1]["finetune_flops"]  # every rank's tokens counted once

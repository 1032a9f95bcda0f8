"""Zero-shot PubMedQA accuracy and macro-F1 of a loaded model, and the training FLOPs behind it.

Each model is one of our checkpoints (a run directory: the checkpoint it stands for; or a checkpoint directory) or
a local Hugging Face causal-LM directory (GPT-2 exports load into our GPT, so inference converters apply; any other
architecture runs through `transformers.AutoModelForCausalLM`), loaded by `modelzoo.inference`. Every question is
scored as lm-evaluation-harness scores its `pubmedqa` task (`scoring.choice_loglikelihoods`), the answer is the
most likely choice, and the majority-class baseline of the same questions is reported beside every number.
`results.write_results` turns the results into a markdown table, JSON and a plot of accuracy against FLOPs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from modelzoo import checkpoint as ckpt
from modelzoo.config import Config, config_from_yaml
from modelzoo.config.evaluate import EvaluateConfig
from modelzoo.downstream.pubmedqa import CHOICES, majority_baseline, pubmedqa_prompt
from modelzoo.downstream.scoring import LogitsFn, choice_loglikelihoods
from modelzoo.errors import CheckpointError
from modelzoo.flops import flop_report
from modelzoo.inference import is_hf_dir, load_for_inference

LM_EVAL_DEFAULT_MAX_LENGTH = 2048  # lm-eval's window when neither config nor tokenizer gives one
TOKENIZER_INFINITY = 1e29  # `model_max_length` of tokenizers that set none


@dataclass
class LoadedModel:
    """A model ready for scoring, and what the results table says about it."""

    name: str
    source: str
    kind: str  # "checkpoint" | "hf (ours)" | "hf (transformers)"
    logits_fn: LogitsFn
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    parameters: int
    train_flops: float | None  # sparse-effective training FLOPs, when the run that made it is known
    dense_train_flops: float | None
    step: int | None


@dataclass(frozen=True)
class PubMedQAResult:
    """Zero-shot PubMedQA scores of one model on `n` questions, with the majority-class baseline beside them."""

    model: str
    source: str
    kind: str
    split: str
    n: int
    accuracy: float
    macro_f1: float
    baseline_label: str
    baseline_accuracy: float
    baseline_macro_f1: float
    predicted_counts: dict[str, int]
    train_flops: float | None
    dense_train_flops: float | None
    step: int | None
    parameters: int
    seconds: float
    examples_per_s: float
    questions: list[dict] = field(default_factory=list, repr=False)  # per question: pubid, label, scores, predicted


def macro_f1(gold: list[int], predicted: list[int], n_classes: int = len(CHOICES)) -> float:
    """Unweighted mean over classes of each class's F1 (0 for a class neither gold nor predicted)."""
    scores = []
    for c in range(n_classes):
        tp = sum(g == p == c for g, p in zip(gold, predicted, strict=True))
        wrong = sum((g == c) != (p == c) for g, p in zip(gold, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
    return sum(scores) / n_classes


def run_flops(run_cfg: Config, checkpoint: Path) -> tuple[float, float] | None:
    """(sparse-effective, dense) training FLOPs behind `checkpoint` of a run with config `run_cfg`, including
    the run it started from; None when any part is unknown.

    Pre-training: `step x task.batch_size x data.seq_len` tokens at its model's and sparsity's rates, plus the run
    whose export it started from (`task.init_from` = `<run>/hf`). Fine-tuning and soft prompting (`task.pretrained`):
    the stage's FLOPs over every step it ran (its `summary.json`), plus the pre-training up to the checkpoint it
    started from.
    """
    task = run_cfg.task if isinstance(run_cfg.task, dict) else vars(run_cfg.task)
    if "pretrained" in task:
        return _stage_flops(checkpoint.parent.parent / "summary.json", Path(task["pretrained"]))
    if "batch_size" not in task:
        return None
    step = checkpoint_step(checkpoint)
    report = flop_report(run_cfg.model, run_cfg.data.seq_len, run_cfg.sparsity, steps=step)  # each step at its level
    tokens = step * task["batch_size"] * run_cfg.data.seq_len
    sparse, dense = report.sparse_per_token * tokens, report.dense_per_token * tokens
    if task.get("init_from"):
        parent = export_flops(Path(task["init_from"]))
        if parent is None:
            return None
        sparse, dense = sparse + parent[0], dense + parent[1]
    return sparse, dense


def _stage_flops(summary_file: Path, pretrained: Path) -> tuple[float, float] | None:
    """A fine-tuning / soft-prompting run's FLOPs (`summary.json`) plus those of its pre-trained checkpoint."""
    parent = pretrained if (pretrained / ckpt.MANIFEST_FILE).is_file() else ckpt.latest_checkpoint(pretrained)
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if parent is None or "finetune_dense_flops" not in summary:
        return None
    before = checkpoint_flops(parent)
    if before is None:
        return None
    return before[0] + summary["finetune_flops"], before[1] + summary["finetune_dense_flops"]


def checkpoint_flops(checkpoint: Path) -> tuple[float, float] | None:
    """`run_flops` of a checkpoint directory, read from its own config."""
    return run_flops(config_from_yaml(ckpt.read_config(checkpoint)), checkpoint)


def export_flops(directory: Path) -> tuple[float, float] | None:
    """Training FLOPs behind a Hugging Face export written into a run directory (`<run>/hf`), else None."""
    checkpoint = ckpt.latest_checkpoint(directory.resolve().parent)
    return None if checkpoint is None else checkpoint_flops(checkpoint)


def checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / ckpt.MANIFEST_FILE).read_text())["step"]


def our_logits(model: torch.nn.Module) -> LogitsFn:
    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(ids)[0]  # causal: right padding changes no real position's logits

    return logits_fn


def hf_logits(model: torch.nn.Module) -> LogitsFn:
    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits

    return logits_fn


def hf_max_length(config: object, tokenizer: PreTrainedTokenizerBase) -> int:
    """The window lm-eval's HFLM uses: the config's n_positions / max_position_embeddings / n_ctx, else the
    tokenizer's `model_max_length`, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    if tokenizer.model_max_length and tokenizer.model_max_length < TOKENIZER_INFINITY:
        return int(tokenizer.model_max_length)
    return LM_EVAL_DEFAULT_MAX_LENGTH


def load_model(path: str, cfg: Config, key: str) -> LoadedModel:
    """A run, checkpoint or Hugging Face directory `path` (config key `key`) ready for scoring on the task's device
    (`modelzoo.inference`), with the training FLOPs and step behind it where the run that made it is known."""
    task: EvaluateConfig = cfg.task
    if not is_hf_dir(path):
        _refuse_adapted(ckpt.find_checkpoint(path, key))
    loaded = load_for_inference(
        path, key, task.device, task.precision, task.converter, batch_size=task.batch_size, any_causal_lm=True
    )
    model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
    if loaded.run_config is not None:  # a checkpoint
        name, max_length = source.parent.parent.name, loaded.run_config.model.n_positions
        step, flops = checkpoint_step(source), run_flops(loaded.run_config, source)
    else:
        run = ckpt.latest_checkpoint(source.resolve().parent)  # an export inside its run directory: `<run>/hf`
        name = f"{source.resolve().parent.name}/{source.name}" if run else source.name
        max_length = hf_max_length(loaded.hf_config, tokenizer)
        step, flops = (checkpoint_step(run) if run else None), export_flops(source)
    return LoadedModel(
        name=name,
        source=str(source),
        kind=loaded.kind,
        logits_fn=hf_logits(model) if loaded.kind == "hf (transformers)" else our_logits(model),
        tokenizer=tokenizer,
        max_length=max_length,
        parameters=sum(p.numel() for p in model.parameters()),
        train_flops=flops[0] if flops else None,
        dense_train_flops=flops[1] if flops else None,
        step=step,
    )


def _refuse_adapted(checkpoint: Path) -> None:
    """Refuse soft-prompt and HoC checkpoints, which are not plain causal LMs, saying where their scores are."""
    task = OmegaConf.create(ckpt.read_config(checkpoint)).get("task", {})
    if "num_virtual_tokens" not in task and task.get("dataset") != "hoc":
        return
    what = "a HoC classifier" if task.get("dataset") == "hoc" else "a soft prompt in front of a frozen GPT"
    raise CheckpointError(
        f"{checkpoint} holds {what} ({task.get('name')}), not a causal LM: task.checkpoints takes pre-training "
        f"and PubMedQA fine-tuning runs. Its test scores are in {checkpoint.parent.parent / 'summary.json'}; "
        "a soft prompt loads with PEFT from <run>/adapter on <run>/hf"
    )


def evaluate_pubmedqa(
    model: LoadedModel,
    examples: list,
    split: str,
    batch_size: int = 8,
    with_long_answer: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> PubMedQAResult:
    """Score every example's three choices, predict the most likely (first on ties, as numpy's argmax), and
    compare with the gold labels and the majority-class baseline."""
    prompts = [pubmedqa_prompt(e, with_long_answer) for e in examples]
    start = time.perf_counter()
    scores = choice_loglikelihoods(
        model.logits_fn,
        model.tokenizer,
        prompts,
        CHOICES,
        batch_size=batch_size,
        progress=progress,
        max_length=model.max_length,
        device=device,
    )
    seconds = time.perf_counter() - start
    predicted = scores.argmax(dim=1).tolist()
    gold = [e.label_index for e in examples]
    label, baseline = majority_baseline(examples)
    return PubMedQAResult(
        model=model.name,
        source=model.source,
        kind=model.kind,
        split=split,
        n=len(examples),
        accuracy=sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(examples),
        macro_f1=macro_f1(gold, predicted),
        baseline_label=label,
        baseline_accuracy=baseline,
        baseline_macro_f1=macro_f1(gold, [CHOICES.index(label)] * len(examples)),
        predicted_counts={c: predicted.count(i) for i, c in enumerate(CHOICES)},
        train_flops=model.train_flops,
        dense_train_flops=model.dense_train_flops,
        step=model.step,
        parameters=model.parameters,
        seconds=seconds,
        examples_per_s=len(examples) / seconds,
        questions=[
            {
                "pubid": e.pubid,
                "label": e.label,
                "scores": dict(zip(CHOICES, row, strict=True)),
                "predicted": CHOICES[p],
            }
            for e, row, p in zip(examples, scores.tolist(), predicted, strict=True)
        ],
    )

"""`modelzoo evaluate`: zero-shot PubMedQA accuracy and macro-F1 of checkpoints and Hugging Face directories.

Each model is one of our checkpoints (a run directory: its latest checkpoint; or a checkpoint directory) or a
local Hugging Face causal-LM directory (GPT-2 exports load into our GPT, so sparse backends apply; any other
architecture runs through `transformers.AutoModelForCausalLM`). Every question is scored as lm-evaluation-harness
scores its `pubmedqa` task (`scoring.choice_loglikelihoods`), the answer is the most likely choice, and the
majority-class baseline of the same questions is reported beside every number. `results.write_results` turns
the list into a markdown table, JSON and a plot of accuracy against training FLOPs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerBase

from modelzoo.backends.converters import convert
from modelzoo.config import Config
from modelzoo.downstream.config import EvaluateConfig
from modelzoo.downstream.pubmedqa import CHOICES, load_pubmedqa, majority_baseline, pubmedqa_prompt
from modelzoo.downstream.scoring import LogitsFn, choice_loglikelihoods
from modelzoo.errors import CheckpointError
from modelzoo.export.hf import load_hf, restore_masks
from modelzoo.finite import refuse_nonfinite
from modelzoo.flops import flop_report
from modelzoo.generate import DTYPES
from modelzoo.models.gpt import GPT
from modelzoo.restore import require_tokenizer, restore_model
from modelzoo.train.checkpoint import MANIFEST_FILE, latest_checkpoint, read_config, selected_checkpoint
from modelzoo.train.config import resolved_device

log = logging.getLogger(__name__)
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
    parent = pretrained if (pretrained / MANIFEST_FILE).is_file() else latest_checkpoint(pretrained)
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if parent is None or "finetune_dense_flops" not in summary:
        return None
    before = checkpoint_flops(parent)
    if before is None:
        return None
    return before[0] + summary["finetune_flops"], before[1] + summary["finetune_dense_flops"]


def checkpoint_flops(checkpoint: Path) -> tuple[float, float] | None:
    """`run_flops` of a checkpoint directory, read from its own config."""
    saved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(read_config(checkpoint)))
    return run_flops(OmegaConf.to_object(saved), checkpoint)


def export_flops(directory: Path) -> tuple[float, float] | None:
    """Training FLOPs behind a Hugging Face export written into a run directory (`<run>/hf`), else None."""
    checkpoint = latest_checkpoint(directory.resolve().parent)
    return None if checkpoint is None else checkpoint_flops(checkpoint)


def checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / MANIFEST_FILE).read_text())["step"]


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


def load_checkpoint_model(path: str, cfg: Config) -> LoadedModel:
    """A run directory (its latest checkpoint) or a checkpoint directory, as our GPT on the task's device."""
    checkpoint = selected_checkpoint(path) if not (Path(path) / MANIFEST_FILE).is_file() else Path(path)
    if checkpoint is None:
        raise CheckpointError(f"{path}: neither a checkpoint nor a run directory with checkpoints/latest")
    _refuse_adapted(checkpoint)
    run = restore_model(checkpoint)
    model, run_cfg, tokenizer = run.model, run.config, require_tokenizer(run, "encode the questions")
    step = checkpoint_step(checkpoint)
    flops = run_flops(run_cfg, checkpoint)
    model = _prepare(model, cfg)
    return LoadedModel(
        name=checkpoint.parent.parent.name,
        source=str(checkpoint),
        kind="checkpoint",
        logits_fn=our_logits(model),
        tokenizer=tokenizer,
        max_length=run_cfg.model.n_positions,
        parameters=sum(p.numel() for p in model.parameters()),
        train_flops=flops[0] if flops else None,
        dense_train_flops=flops[1] if flops else None,
        step=step,
    )


def _refuse_adapted(checkpoint: Path) -> None:
    """Refuse soft-prompt and HoC checkpoints, which are not plain causal LMs, saying where their scores are."""
    task = OmegaConf.create(read_config(checkpoint)).get("task", {})
    if "num_virtual_tokens" not in task and task.get("dataset") != "hoc":
        return
    what = "a HoC classifier" if task.get("dataset") == "hoc" else "a soft prompt in front of a frozen GPT"
    raise CheckpointError(
        f"{checkpoint} holds {what} ({task.get('name')}), not a causal LM: task.checkpoints takes pre-training "
        f"and PubMedQA fine-tuning runs. Its test scores are in {checkpoint.parent.parent / 'summary.json'}; "
        "a soft prompt loads with PEFT from <run>/adapter on <run>/hf"
    )


def load_hf_model(path: str, cfg: Config) -> LoadedModel:
    """A Hugging Face directory: GPT-2 into our GPT (masks from sparsity.json), other architectures via
    `AutoModelForCausalLM`. Training FLOPs are those of the run holding it (`<run>/hf`), as `run_flops` counts them."""
    task: EvaluateConfig = cfg.task
    directory = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if isinstance(hf_config, GPT2Config):
        model = load_hf(directory)
        restore_masks(model, directory)
        model = _prepare(model, cfg)
        logits_fn, kind = our_logits(model), "hf (ours)"
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        refuse_nonfinite(model.state_dict().items(), directory, "it cannot be evaluated")
        model = model.to(resolved_device(task.device), DTYPES[task.precision]).eval()
        logits_fn, kind = hf_logits(model), "hf (transformers)"
    run = latest_checkpoint(directory.resolve().parent)  # an export inside its run directory: `<run>/hf`
    flops = export_flops(directory)
    return LoadedModel(
        name=f"{directory.resolve().parent.name}/{directory.name}" if run else directory.name,
        source=str(directory),
        kind=kind,
        logits_fn=logits_fn,
        tokenizer=tokenizer,
        max_length=hf_max_length(hf_config, tokenizer),
        parameters=sum(p.numel() for p in model.parameters()),
        train_flops=flops[0] if flops else None,
        dense_train_flops=flops[1] if flops else None,
        step=checkpoint_step(run) if run else None,
    )


def _prepare(model: GPT, cfg: Config) -> GPT:
    """`model` on the task's device and dtype, converted by the backend for full-window batches."""
    task: EvaluateConfig = cfg.task
    model = model.to(resolved_device(task.device), DTYPES[task.precision]).eval()
    return convert(model, cfg.backend.name, tokens=task.batch_size * model.config.n_positions)


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


def model_loaders(cfg: Config) -> list[Callable[[], LoadedModel]]:
    """One loader per requested model (loaded one at a time, so only one is in memory)."""
    task: EvaluateConfig = cfg.task
    checkpoints = task.checkpoints or ([] if task.hf_dirs else [cfg.run_dir])
    return [lambda p=p: load_checkpoint_model(p, cfg) for p in checkpoints] + [
        lambda p=p: load_hf_model(p, cfg) for p in task.hf_dirs
    ]


def run(cfg: Config) -> list[PubMedQAResult]:
    """`modelzoo evaluate` on a validated `cfg`: load the questions once, evaluate each model in turn."""
    task: EvaluateConfig = cfg.task
    examples = load_pubmedqa(task.pubmedqa_data, task.split)
    examples = examples[: task.limit] if task.limit else examples
    results = []
    loaders = model_loaders(cfg)
    for loader in tqdm(loaders, desc="models", unit="model", disable=not task.progress or len(loaders) == 1):
        model = loader()
        log.info("evaluate: %s (%s) on %d PubMedQA %s questions", model.name, model.source, len(examples), task.split)
        results.append(
            evaluate_pubmedqa(
                model,
                examples,
                task.split,
                task.batch_size,
                task.with_long_answer,
                task.progress,
                resolved_device(task.device),
            )
        )
    return results

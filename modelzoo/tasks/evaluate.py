"""`modelzoo evaluate`: zero-shot PubMedQA of checkpoints and Hugging Face directories; table, JSON and plot."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tqdm.auto import tqdm

from modelzoo.config import Config
from modelzoo.config.evaluate import EvaluateConfig
from modelzoo.config.train import resolved_device
from modelzoo.downstream.evaluate import LoadedModel, PubMedQAResult, evaluate_pubmedqa, load_model
from modelzoo.downstream.pubmedqa import load_pubmedqa
from modelzoo.downstream.results import markdown_table, write_results
from modelzoo.downstream.sampling import stratified_sample
from modelzoo.validate import validated_config

log = logging.getLogger(__name__)


def model_loaders(cfg: Config) -> list[Callable[[], LoadedModel]]:
    """One loader per requested model (loaded one at a time, so only one is in memory)."""
    task: EvaluateConfig = cfg.task
    sources = [(p, "task.checkpoints") for p in task.checkpoints] + [(p, "task.hf_dirs") for p in task.hf_dirs]
    return [lambda p=p, k=k: load_model(p, cfg, k) for p, k in sources or [(cfg.run_dir, "run_dir")]]


def run(cfg: Config) -> list[PubMedQAResult]:
    """Evaluate a validated `cfg`: load the questions once, evaluate each model in turn."""
    task: EvaluateConfig = cfg.task
    examples = load_pubmedqa(task.pubmedqa_data, task.split)
    if task.limit_first:
        examples = examples[: task.limit or None]
    else:
        what = f"PubMedQA {task.split} questions"
        examples = stratified_sample(examples, task.limit, lambda e: e.label, what)
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


def main(overrides: list[str]) -> None:
    cfg = validated_config(overrides, "evaluate")
    results = run(cfg)
    print(markdown_table(results))
    for what, path in write_results(results, cfg.task.output_dir).items():
        print(f"{what}: {path}")

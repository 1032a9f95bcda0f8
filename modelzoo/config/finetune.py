"""Configs of `task=finetune` and `task=prompt_tune`, and their validation against the pre-trained checkpoint.

Model shape, tokenizer and sparsity come from the pre-trained checkpoint (`task.pretrained`: a run directory
of `modelzoo pretrain` or one of its checkpoints), not from the root `model` / `sparsity` groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelzoo.checkpoint import CONFIG_FILE

DATASETS = ("pubmedqa", "hoc")
SPARSITY_MODES = ("dense", "keep")


@dataclass
class FinetuneConfig:
    """Fine-tune all weights. `sparsity`: `dense` drops the masks so pruned weights learn again (SPDF), `keep`
    holds them. PubMedQA: generative, loss on the answer tokens after the lm-eval prompt; HoC: a multi-label
    head on the last token with BCE loss. The checkpoint best on dev is kept, then scored on test.
    `seq_len` (tokens per example, context cut from the left for PubMedQA, text from the right for HoC)
    defaults to the model's positions minus any virtual tokens; `lr` overrides `optim.lr`. The run writes to
    `output_dir` (default: `output_dir()`), never over the pre-training run's own files.
    `limit` keeps N examples of every split (0: all), a sample stratified by label and drawn with a fixed seed,
    for smoke runs; its numbers are not comparable.
    The run checkpoints at every evaluation (the best on dev is kept beside the newest `keep_checkpoints`) and
    continues a killed run exactly with `resume: true`; it runs under torchrun like pre-training (`batch_size` is
    the global batch).
    """

    name: str = "finetune"
    pretrained: str = "runs/tiny-static_75"
    output_dir: str | None = None
    dataset: str = "pubmedqa"
    data_dir: str | None = None
    sparsity: str = "dense"
    with_long_answer: bool = False
    limit: int = 0
    max_steps: int = 200
    batch_size: int = 8
    micro_batch_size: int = 8
    eval_batch_size: int = 16
    eval_every: int = 50
    log_every: int = 10
    seq_len: int | None = None
    lr: float | None = None
    device: str = "auto"
    precision: str = "fp32"
    keep_checkpoints: int = 1
    resume: bool = False
    export: bool = True


@dataclass
class PromptTuneConfig(FinetuneConfig):
    """Soft prompting: `num_virtual_tokens` trainable embeddings in front of the frozen backbone (for HoC the
    head trains too), initialised from random vocabulary embeddings (`init: vocab`) or `init_text`. Saved as a
    PEFT prompt-tuning adapter in `<run_dir>/adapter`."""

    name: str = "prompt_tune"
    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str = "Answer the biomedical question with yes, no or maybe."


def run_name(task: str, dataset: str, sparsity: str) -> str:
    """The default output directory's name under the pre-trained run, e.g. `finetune-hoc-dense`."""
    return f"{task}-{dataset}-{sparsity}"


def output_dir(task: FinetuneConfig) -> Path:
    """`task.output_dir`, else `<pretrained run>/<name>-<dataset>-<sparsity>` (`-<step dir>` after it when
    `task.pretrained` is one checkpoint: never inside a checkpoint directory, which checkpoint rotation deletes)."""
    if task.output_dir:
        return Path(task.output_dir)
    pretrained, name = Path(task.pretrained), run_name(task.name, task.dataset, task.sparsity)
    if (pretrained / CONFIG_FILE).is_file():
        return pretrained.parent.parent / f"{name}-{pretrained.name}"
    return pretrained / name


def default_data_dir(dataset: str) -> str:
    return f"../shared/data/{dataset}"

"""Configs of `task=finetune` and `task=prompt_tune`, and their validation against the pre-trained checkpoint.

Model shape, tokenizer and sparsity come from the pre-trained checkpoint (`task.pretrained`: a run directory
of `modelzoo pretrain` or one of its checkpoints), not from the root `model` / `sparsity` groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from modelzoo.errors import ConfigError
from modelzoo.models.soft_prompt import PROMPT_INITS
from modelzoo.train.config import DEVICES, PRECISIONS

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
    `limit` keeps the first N examples of every split (0: all), for smoke runs; its numbers are not comparable.
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


def output_dir(task: FinetuneConfig) -> Path:
    """`task.output_dir`, else `<pretrained run>/<name>-<dataset>-<sparsity>` (`-<step dir>` after it when
    `task.pretrained` is one checkpoint: never inside a checkpoint directory, which checkpoint rotation deletes)."""
    from modelzoo.train.checkpoint import CONFIG_FILE

    if task.output_dir:
        return Path(task.output_dir)
    pretrained, name = Path(task.pretrained), f"{task.name}-{task.dataset}-{task.sparsity}"
    if (pretrained / CONFIG_FILE).is_file():
        return pretrained.parent.parent / f"{name}-{pretrained.name}"
    return pretrained / name


def default_data_dir(dataset: str) -> str:
    return f"../shared/data/{dataset}"


def pretrained_config(pretrained: str | Path):
    """The `Config` (as a DictConfig) a pre-trained run or checkpoint was trained with."""
    from modelzoo.train.checkpoint import CONFIG_FILE, latest_checkpoint

    path = Path(pretrained)
    checkpoint = path if (path / CONFIG_FILE).is_file() else latest_checkpoint(path) if path.is_dir() else None
    if checkpoint is None:
        raise ConfigError(
            "task.pretrained", f"{pretrained} is neither a run directory with checkpoints nor a checkpoint directory"
        )
    return checkpoint, OmegaConf.load(checkpoint / CONFIG_FILE)


def validate_finetune(task: FinetuneConfig) -> None:
    """Check every key, and the token budget against the pre-trained model's positions, before any compute."""
    if task.dataset not in DATASETS:
        raise ConfigError("task.dataset", f"unknown {task.dataset!r}", DATASETS)
    if task.sparsity not in SPARSITY_MODES:
        raise ConfigError("task.sparsity", f"unknown {task.sparsity!r}", SPARSITY_MODES)
    if task.limit < 0:
        raise ConfigError("task.limit", f"must be >= 0 (0: every example), got {task.limit}")
    for key in ("max_steps", "batch_size", "micro_batch_size", "eval_batch_size", "eval_every", "log_every"):
        if getattr(task, key) <= 0:
            raise ConfigError(f"task.{key}", f"must be positive, got {getattr(task, key)}")
    if task.batch_size % task.micro_batch_size:
        raise ConfigError("task.batch_size", f"{task.batch_size} is not divisible by task.micro_batch_size")
    if task.precision not in PRECISIONS:
        raise ConfigError("task.precision", f"unknown {task.precision!r}", PRECISIONS)
    if task.device not in DEVICES:
        raise ConfigError("task.device", f"unknown {task.device!r}", DEVICES)
    if task.lr is not None and task.lr <= 0:
        raise ConfigError("task.lr", f"must be positive, got {task.lr}")
    data_dir = Path(task.data_dir or default_data_dir(task.dataset))
    if not data_dir.is_dir():
        raise ConfigError("task.data_dir", f"{data_dir} is not a directory (the {task.dataset} files)")
    checkpoint, saved = pretrained_config(task.pretrained)
    positions = int(saved.model.n_positions)
    virtual = task.num_virtual_tokens if isinstance(task, PromptTuneConfig) else 0
    if isinstance(task, PromptTuneConfig):
        if task.init not in PROMPT_INITS:
            raise ConfigError("task.init", f"unknown {task.init!r}", PROMPT_INITS)
        if task.num_virtual_tokens <= 0:
            raise ConfigError("task.num_virtual_tokens", f"must be positive, got {task.num_virtual_tokens}")
        if task.init == "text" and not task.init_text:
            raise ConfigError("task.init_text", "is empty but task.init=text")
    seq_len = task.seq_len if task.seq_len is not None else positions - virtual
    if seq_len < 2 or virtual + seq_len > positions:
        key = "task.num_virtual_tokens" if virtual else "task.seq_len"
        text = f"task.seq_len={seq_len}" if task.seq_len is not None else f"{seq_len} tokens of text"
        raise ConfigError(
            key,
            f"{virtual} virtual tokens + {text} do not fit the model's {positions} positions "
            f"(model.n_positions in {checkpoint}/config.yaml); at least 2 tokens of text must remain",
        )

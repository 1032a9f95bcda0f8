"""What the `prune` task reads and writes: our checkpoints or Hugging Face directories in, a Hugging Face directory out.

The output is the hand-off format of the rest of the zoo: safetensors weights with the pruned entries at exact
zero, the tokenizer, and `sparsity.json` listing every pruned tensor (with its measured sparsity), so the masks
are the nonzeros of the listed tensors. Sparse continued pre-training reads it with
`modelzoo pretrain task.init_from=<dir> sparsity.init_method=from_weights` (GPT-2 and Llama families), and
`modelzoo.export.hf.restore_masks` re-creates the mask buffers on a loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from modelzoo.checkpoint import resolve_checkpoint
from modelzoo.config.prune import PruneConfig
from modelzoo.data.config import TokenizerConfig
from modelzoo.data.tokenizer import holds_tokenizer, load_pretrained
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.export.hf import export_hf, save_hf_directory, sparsity_report
from modelzoo.prune.layers import attach_masks
from modelzoo.restore import restore_model


@dataclass
class Source:
    """The model to prune, its tokenizer, where it came from and where its pruned copy goes by default."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    path: Path
    default_output: Path


def load_source(task: PruneConfig, run_dir: str, tokenizer: TokenizerConfig) -> Source:
    """`task.hf_dir` as a Hugging Face causal LM, else `task.checkpoint` (or `run_dir`'s latest) as our model.

    The tokenizer is the model's own (the run's `tokenizer/`, or the HF directory's); `tokenizer.path` stands in
    when the model has none.

    Raises:
        CheckpointError: no checkpoint or no HF model at the given path.
        ConfigError: no tokenizer with the model and no `tokenizer.path`.
    """
    if task.hf_dir:
        path = Path(task.hf_dir)
        model, own = load_causal_lm(path)
        default_output = path.parent / f"{path.name}-{task.tag}"
    else:
        path = resolve_checkpoint(task.checkpoint, run_dir)
        run = restore_model(path)
        model, own = run.model, run.tokenizer
        default_output = path.parent.parent / "pruned" / task.tag
    if own is None:
        if tokenizer.path is None:
            raise ConfigError("tokenizer.path", f"{path} has no tokenizer; give the directory of the model's tokenizer")
        own = load_pretrained(tokenizer.path)
    return Source(model, own, path, default_output)


def load_causal_lm(directory: Path) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """A local Hugging Face causal LM (weights as stored) and its tokenizer when the directory has one."""
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; task.hf_dir must be a save_pretrained directory")
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(directory) if holds_tokenizer(directory) else None


def save_pruned(
    model: nn.Module,
    output_dir: Path,
    tokenizer: PreTrainedTokenizerBase | None,
    masks: dict[str, torch.Tensor],
    info: dict,
) -> Path:
    """Write the pruned model as a Hugging Face directory with `sparsity.json`; replace `output_dir` atomically.

    Our model goes through `export_hf` (its family's HF layout) with the masks attached as `<param>_mask` buffers;
    a Hugging Face model is saved as it is, its pruned weights already exact zeros.
    """
    if isinstance(model, PreTrainedModel):
        return save_hf_directory(model, output_dir, tokenizer, sparsity_report(model.state_dict(), list(masks), info))
    attach_masks(model, masks)
    return export_hf(model, output_dir, tokenizer, info)

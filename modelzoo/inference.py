"""Loading a model for inference (`generate`, `evaluate`): the one place.

A source is a run directory (the checkpoint it stands for), a checkpoint directory, or a Hugging Face directory.
Our checkpoints and GPT-2 / Llama exports load into our models, with their masks (from the checkpoint, or an export's
`sparsity.json`); other causal LMs load through `AutoModelForCausalLM` where the caller allows it. The model is put
on the task's device and dtype, in eval mode, and rewritten by the inference converter `task.converter` chooses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from modelzoo import checkpoint as ckpt
from modelzoo.backends.converters import convert
from modelzoo.config import Config
from modelzoo.config.train import resolved_device
from modelzoo.errors import ConfigError
from modelzoo.export.hf import BY_MODEL_TYPE, load_hf, restore_masks
from modelzoo.finite import refuse_nonfinite
from modelzoo.restore import require_tokenizer, restore_model

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class InferenceModel:
    """A loaded model ready for forward calls, and where it came from."""

    model: nn.Module  # our GPT or Llama, or a `transformers` model (kind "hf (transformers)")
    tokenizer: PreTrainedTokenizerBase
    source: Path  # the checkpoint or Hugging Face directory read
    kind: str  # "checkpoint" | "hf (ours)" | "hf (transformers)"
    hf_config: object | None  # the Hugging Face config of an HF directory; None for a checkpoint
    run_config: Config | None  # the saved config of a checkpoint; None for an HF directory


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model directory (a `config.json`, not one of our checkpoints)."""
    return (Path(path) / "config.json").is_file() and not (Path(path) / ckpt.CONFIG_FILE).is_file()


def load_for_inference(
    path: str | Path,
    key: str,
    device: str,
    precision: str,
    converter: str,
    tokens: int | None = None,
    batch_size: int = 1,
    any_causal_lm: bool = False,
) -> InferenceModel:
    """The model at `path`, ready for forward calls.

    Args:
        path: a run, checkpoint or Hugging Face directory.
        key: the config key that gave `path` (named in errors).
        device: `task.device` (`auto`: CUDA when visible).
        precision: `fp32` or `bf16`.
        converter: the inference converter (`task.converter`: `none`, `torch_sparse`).
        tokens: tokens per forward call the converter plans for; None: `batch_size` full windows.
        batch_size: sequences per forward call (with `tokens` None).
        any_causal_lm: load HF directories of other architectures with `AutoModelForCausalLM` (else refused).
    """
    if is_hf_dir(path):
        directory = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
        if hf_config.model_type in BY_MODEL_TYPE:
            model = load_hf(directory)
            restore_masks(model, directory)
            loaded = InferenceModel(model, tokenizer, directory, "hf (ours)", hf_config, None)
        elif any_causal_lm:
            model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
            refuse_nonfinite(model.state_dict().items(), directory, "it cannot be evaluated")
            loaded = InferenceModel(model, tokenizer, directory, "hf (transformers)", hf_config, None)
        else:
            raise ConfigError(
                key, f"{directory} holds a {type(hf_config).__name__}; this command runs GPT-2 and Llama models"
            )
    else:
        checkpoint = ckpt.find_checkpoint(path, key)
        run = restore_model(checkpoint)
        tokenizer = require_tokenizer(run, "encode the text")
        loaded = InferenceModel(run.model, tokenizer, checkpoint, "checkpoint", None, run.config)
    log.info("%s: loaded %s (%s)", key, loaded.source, loaded.kind)
    loaded.model = loaded.model.to(resolved_device(device), DTYPES[precision]).eval()
    if loaded.kind != "hf (transformers)":
        window = loaded.model.config.n_positions
        loaded.model = convert(loaded.model, converter, tokens=batch_size * window if tokens is None else tokens)
    return loaded

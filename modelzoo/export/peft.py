"""Soft prompts in PEFT's prompt-tuning format: `adapter_config.json` + `adapter_model.safetensors`.

`peft.PeftModel.from_pretrained(hf_model, directory)` on our Hugging Face export (GPT-2 or Llama) loads the adapter
and computes the same logits as our `PromptedLM` / `Classifier` (PEFT puts the virtual tokens in front of the input
embeddings at positions 0..N-1, as our models' `hidden(prefix=...)` does). The config is written by
`peft.PromptTuningConfig` itself; the weights are PEFT's key `prompt_embeddings` (N, C) and, for
`SEQ_CLS`, the trained head under PEFT's `modules_to_save` key.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType
from safetensors.torch import load_file, save_file

from modelzoo.atomic import atomic_directory
from modelzoo.errors import CheckpointError
from modelzoo.models.registry import ModelConfig
from modelzoo.models.soft_prompt import SoftPrompt

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PROMPT_KEY = "prompt_embeddings"
SCORE_KEY = "base_model.score.weight"  # an HF sequence classifier's head as PEFT saves a modules_to_save copy
TASK_TYPES = {"causal_lm": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS}
INITS = {"vocab": PromptTuningInit.SAMPLE_VOCAB, "text": PromptTuningInit.TEXT}


def save_prompt_adapter(
    prompt: SoftPrompt,
    output_dir: str | os.PathLike,
    model_config: ModelConfig,
    task_type: str,
    base_model_dir: str | os.PathLike | None = None,
    init: str = "vocab",
    init_text: str | None = None,
    score_weight: torch.Tensor | None = None,
) -> Path:
    """Write `prompt` (and, for `seq_cls`, the head `score_weight`) as a PEFT prompt-tuning adapter."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type={task_type!r}; allowed: {', '.join(TASK_TYPES)}")
    if (score_weight is not None) != (task_type == "seq_cls"):
        raise ValueError("score_weight goes with task_type='seq_cls' and only with it")
    base = str(base_model_dir) if base_model_dir is not None else None
    config = PromptTuningConfig(
        task_type=TASK_TYPES[task_type],
        num_virtual_tokens=prompt.num_virtual_tokens,
        token_dim=model_config.n_embd,
        num_transformer_submodules=1,
        num_attention_heads=model_config.n_head,
        num_layers=model_config.n_layer,
        prompt_tuning_init=INITS[init],
        prompt_tuning_init_text=init_text if init == "text" else None,
        tokenizer_name_or_path=base if init == "text" else None,
        base_model_name_or_path=base,
        inference_mode=True,
    )
    tensors = {PROMPT_KEY: prompt.embedding.detach().cpu().contiguous()}
    if score_weight is not None:
        tensors[SCORE_KEY] = score_weight.detach().cpu().contiguous()
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as directory:
        config.save_pretrained(str(directory))
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return output_dir


def load_prompt_adapter(directory: str | os.PathLike) -> tuple[SoftPrompt, torch.Tensor | None]:
    """(the soft prompt, the `SEQ_CLS` head weight or None) of an adapter directory."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}; expected a PEFT prompt-tuning adapter")
    tensors = load_file(str(directory / WEIGHTS_FILE))
    if PROMPT_KEY not in tensors:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} holds no {PROMPT_KEY!r}: not a prompt-tuning adapter")
    embedding = tensors[PROMPT_KEY]
    prompt = SoftPrompt(*embedding.shape)
    with torch.no_grad():
        prompt.embedding.copy_(embedding)
    return prompt, tensors.get(SCORE_KEY)

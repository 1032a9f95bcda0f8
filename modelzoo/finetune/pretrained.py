"""Load a pre-trained checkpoint for downstream training, with its masks dropped (`dense`) or held (`keep`).

`dense` (SPDF's dense fine-tuning): the weights load without their masks, so the pruned entries start at
exactly zero and learn again. `keep`: the checkpoint's masks are attached by the sparsity plug-in as a static
group over exactly the masked weights, so gradients, Adam state and weights stay zero where they were pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modelzoo.errors import CheckpointError
from modelzoo.export.hf import TIED_KEY, TIED_SOURCE
from modelzoo.models.gpt import GPT
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MASK_SUFFIX, MaskedSparsity
from modelzoo.train import checkpoint as ckpt


@dataclass
class Pretrained:
    model: GPT
    sparsifier: MaskedSparsity | None  # `keep` with a sparse checkpoint: the plug-in holding its masks
    tokenizer: PreTrainedTokenizerBase
    config: object  # the pre-training run's `Config`


def checkpoint_masks(path: Path) -> dict[str, torch.Tensor]:
    """The `<param>_mask` tensors stored in a checkpoint."""
    file = path / ckpt.MODEL_FILE
    with safe_open(str(file), framework="pt") as f:
        names = [key for key in f.keys() if key.endswith(MASK_SUFFIX)]  # noqa: SIM118 (safe_open is no dict)
        return {key: f.get_tensor(key) for key in names}


def load_pretrained(checkpoint: Path, keep_masks: bool, seed: int) -> Pretrained:
    """Our GPT from a verified checkpoint directory, its masks held (`keep_masks`) or dropped."""
    from modelzoo.config import Config

    ckpt.verify_checkpoint(checkpoint)
    saved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(ckpt.read_config(checkpoint)))
    cfg = OmegaConf.to_object(saved)
    tokenizer_dir = checkpoint.parent.parent / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"{tokenizer_dir} is missing: the run's tokenizer is needed to encode the data")
    model = GPT(cfg.model)
    masks = checkpoint_masks(checkpoint) if keep_masks else {}
    sparsifier = None
    if masks:
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        held = SparsityConfig(
            sparsity=1.0 - kept / total,
            algorithm="static",
            init_method="from_weights",
            param_filter=[name.removesuffix(MASK_SUFFIX) for name in masks],
        )
        sparsifier = MaskedSparsity(held, seed)
        sparsifier.apply(model)
        ckpt.load_model_weights(checkpoint, model, sparsifier.mask_names())  # the saved masks, exactly
    else:
        state = {k: v for k, v in load_file(str(checkpoint / ckpt.MODEL_FILE)).items() if not k.endswith(MASK_SUFFIX)}
        result = model.load_state_dict(state, strict=False)
        missing = sorted(set(result.missing_keys) - {TIED_KEY, TIED_SOURCE})  # tied: one of the two is stored
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"{checkpoint / ckpt.MODEL_FILE} does not match the model: missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Pretrained(model, sparsifier, tokenizer, cfg)

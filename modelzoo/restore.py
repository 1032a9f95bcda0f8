"""Restoring a run from its checkpoint: saved config, model with masks and weights, tokenizer. The one place.

Checkpoint files are read by `modelzoo.checkpoint` (pure I/O); this module sits above models and sparsity
and turns them back into objects. Every command that starts from a checkpoint (`export`, `generate`, `evaluate`,
`prune`, `finetune`, the Cerebras conversions) comes through here.

Masks (`masks=`):
- `config`: the sparsity the run was trained with creates the `<param>_mask` buffers, which the checkpoint fills
  (a checkpoint lacking one, or holding one the config does not create, is refused);
- `held`: the checkpoint's own masks are held by a static sparsity plug-in over exactly the masked weights, so
  training keeps pruned weights, gradients and Adam state at zero (fine-tuning with `task.sparsity=keep`);
- `none`: masks are dropped and the pruned weights load as the exact zeros they are (dense fine-tuning, SPDF).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modelzoo import checkpoint as ckpt
from modelzoo.config import Config, config_from_yaml
from modelzoo.errors import CheckpointError
from modelzoo.finite import refuse_nonfinite
from modelzoo.models.registry import CausalLM
from modelzoo.models.registry import build_model as new_model
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.sparsity.plugin import MaskedSparsity

log = logging.getLogger(__name__)
Masks = Literal["config", "held", "none"]


@dataclass
class Restored:
    model: CausalLM
    config: Config  # the run's config as it was saved
    tokenizer: PreTrainedTokenizerBase | None  # the run's `tokenizer/`, None when it has none
    sparsifier: MaskedSparsity | None  # the plug-in holding the masks (None without masks)
    checkpoint: Path


def saved_config(checkpoint: str | Path) -> Config:
    """The `Config` a checkpoint was written with."""
    return config_from_yaml(ckpt.read_config(checkpoint))


def build_model(cfg: Config) -> tuple[CausalLM, MaskedSparsity | None]:
    """A freshly initialised model of `cfg.model` with the masks `cfg.sparsity` draws (None when dense)."""
    model = new_model(cfg.model)
    if not cfg.sparsity.enabled:
        return model, None
    sparsifier = MaskedSparsity(cfg.sparsity, cfg.seed)
    sparsifier.apply(model)
    return model, sparsifier


def held_sparsity(masks: dict[str, object]) -> SparsityConfig:
    """A static sparsity config over exactly the masked weights of `masks` (`<param>_mask` -> mask), at their level."""
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return SparsityConfig(
        sparsity=1.0 - kept / total,
        algorithm="static",
        init_method="from_weights",
        param_filter=[name.removesuffix(MASK_SUFFIX) for name in masks],
    )


def load_tokenizer(checkpoint: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved beside a run's checkpoints (`<run>/tokenizer`), or None."""
    directory = checkpoint.parent.parent / "tokenizer"
    return AutoTokenizer.from_pretrained(directory) if directory.is_dir() else None


def restore_model(checkpoint: str | Path, masks: Masks = "config") -> Restored:
    """The model of a verified checkpoint with its weights, and its masks as `masks` says (module docstring)."""
    checkpoint = Path(checkpoint)
    weights = ckpt.weight_files(checkpoint)
    ckpt.verify_checkpoint(checkpoint, only=weights)
    log.info("%s: verified %s (all that is read here; a resume verifies the rest)", checkpoint, ", ".join(weights))
    cfg = saved_config(checkpoint)
    sparsifier: MaskedSparsity | None = None
    if masks == "config":
        model, sparsifier = build_model(cfg)
        ckpt.load_model_weights(checkpoint, model, sparsifier.mask_names() if sparsifier else [])
    elif masks == "held" and (stored := ckpt.checkpoint_masks(checkpoint)):
        model = new_model(cfg.model)
        sparsifier = MaskedSparsity(held_sparsity(stored), cfg.seed)
        sparsifier.apply(model)
        ckpt.load_model_weights(checkpoint, model, sparsifier.mask_names())  # the saved masks, exactly
    else:
        model = new_model(cfg.model)
        ckpt.load_model_weights(checkpoint, model, [], drop_masks=True)
    refuse_nonfinite(
        model.state_dict().items(),
        ckpt.weights_path(checkpoint),
        "use an earlier checkpoint (task.checkpoint=<its step_* dir>)",
    )
    return Restored(model, cfg, load_tokenizer(checkpoint), sparsifier, checkpoint)


def require_tokenizer(restored: Restored, why: str) -> PreTrainedTokenizerBase:
    """The restored run's tokenizer, or a `CheckpointError` saying it is missing and what it is needed for."""
    if restored.tokenizer is None:
        raise CheckpointError(f"{restored.checkpoint.parent.parent} has no tokenizer/ directory to {why}")
    return restored.tokenizer

"""Where the prunable weights are: the transformer blocks of a causal LM and the linear layers inside them.

Works on our GPT and Hugging Face `GPT2LMHeadModel` (blocks at `transformer.h`) and on the Llama family
(`LlamaForCausalLM` and its relatives, blocks at `model.layers`). Weights are handled as (out, in) matrices
whatever the layer stores: `nn.Linear` keeps (out, in), HF GPT-2's `Conv1D` keeps (in, out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from modelzoo.sparsity.masks import attach_mask
from modelzoo.sparsity.names import select_parameters

BLOCK_LISTS = ("transformer.h", "model.layers")  # GPT / GPT-2, Llama family


@dataclass
class PrunableLayer:
    """One linear layer whose weight is pruned; `name` is the weight's parameter name in the model."""

    name: str
    module: nn.Linear | Conv1D

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    def matrix(self) -> torch.Tensor:
        """The weight as (out, in), a view of the parameter."""
        weight = self.module.weight.detach()
        return weight.T if self.transposed else weight

    @torch.no_grad()
    def write(self, matrix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Store an (out, in) weight that is zero outside `mask`; return the mask in the parameter's layout."""
        self.matrix().copy_(matrix.masked_fill(~mask, 0))
        return mask.T.contiguous() if self.transposed else mask


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks of `model` and their path, e.g. `("model.layers", ...)` for Llama."""
    for path in BLOCK_LISTS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return path, blocks
    raise ValueError(
        f"{type(model).__name__} has no transformer blocks at any of {BLOCK_LISTS}; one-shot pruning supports our "
        "GPT, Hugging Face GPT-2 and Llama-family causal LMs"
    )


def select_layers(model: nn.Module, globs: list[str] | None) -> list[list[PrunableLayer]]:
    """The linear layers of each block whose weight `globs` selects (`None`: Cerebras' default filter).

    Parameters outside the blocks (embeddings, LM head) are never pruned, whatever the filter says.
    """
    prefix, blocks = find_blocks(model)
    selected = set(select_parameters(model, globs))
    per_block = []
    for i, block in enumerate(blocks):
        layers = []
        for module_name, module in block.named_modules():
            name = f"{prefix}.{i}.{module_name}.weight"
            if isinstance(module, (nn.Linear, Conv1D)) and name in selected:
                layers.append(PrunableLayer(name, module))
        per_block.append(layers)
    return per_block


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Register each mask as the persistent bool buffer `<param>_mask` beside its weight.

    The layout `MaskedSparsity.apply` creates, so checkpoints and `export_hf` treat the model as sparse.
    """
    for name, mask in masks.items():
        attach_mask(model, name, mask)

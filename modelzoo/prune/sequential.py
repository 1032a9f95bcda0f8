"""Block-by-block one-shot pruning of a causal LM, after SparseGPT's `*_sequential` driver (arXiv 2301.00774).

The calibration sequences are embedded once and caught at the input of the first transformer block. Then each
block in turn is moved to the compute device and:
1. run on its inputs with forward hooks on its selected linear layers, which accumulate each layer's X Xᵀ;
2. has each selected layer pruned from those statistics (SparseGPT, Wanda or magnitude);
3. is run again, pruned, and its outputs become the next block's inputs,
so every block is calibrated on what the already-pruned blocks before it produce. Only the current block, its
statistics and the calibration activations live on the device; the rest of the model stays where it is (CPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from modelzoo.config.prune import PruneConfig
from modelzoo.prune.hessian import InputStats, relative_error
from modelzoo.prune.layers import PrunableLayer, find_blocks, select_layers
from modelzoo.prune.magnitude import magnitude_mask
from modelzoo.prune.sparsegpt import sparsegpt
from modelzoo.prune.wanda import wanda_mask


@dataclass
class LayerReport:
    """How one weight was pruned: relative reconstruction error ||WX - W'X||_F / ||WX||_F on its calibration
    inputs and, for SparseGPT, the Hessian dampening that factorised."""

    name: str
    error: float
    dampening: float | None = None


@dataclass
class PruneResult:
    """The masks (True = kept, in each parameter's layout, on CPU) and one report per pruned weight."""

    masks: dict[str, torch.Tensor]
    layers: list[LayerReport]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned weights."""
        zeros = sum(int((~m).sum()) for m in self.masks.values())
        return zeros / max(sum(m.numel() for m in self.masks.values()), 1)


@dataclass
class BlockInput:
    """What one calibration batch passes to a block: hidden states (B, T, C) and the other arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]

    def to(self, device: torch.device) -> BlockInput:
        return BlockInput(self.hidden.to(device), _to_device(self.args, device), _to_device(self.kwargs, device))

    def run(self, block: nn.Module) -> torch.Tensor:
        out = block(self.hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out  # HF blocks of older transformers return tuples


class _Caught(Exception):
    """Raised by the hook on the first block once its inputs are recorded: the rest of the forward is not needed."""


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> list[BlockInput]:
    """Run the model up to its first block on each batch of `tokens` (N, T) and record that block's inputs."""
    _, blocks = find_blocks(model)
    captured: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.append(BlockInput(args[0], args[1:], kwargs))
        raise _Caught

    # HF models would otherwise build a KV cache that every block call extends.
    extra = {"use_cache": False} if isinstance(model, PreTrainedModel) else {}
    device = next(model.parameters()).device
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in tokens.split(batch_size):
            with contextlib.suppress(_Caught):
                model(batch.to(device), **extra)
    finally:
        handle.remove()
    return captured


def prune_layer(layer: PrunableLayer, stats: InputStats, config: PruneConfig) -> tuple[torch.Tensor, LayerReport]:
    """Prune one layer in place from its calibration statistics; return its mask (parameter layout) and report."""
    weight = layer.matrix().clone()  # (out, in)
    hessian = stats.hessian()
    dampening = None
    if config.method == "sparsegpt":
        result = sparsegpt(
            weight, hessian, config.level, config.pattern, config.block_size, config.dampening, config.update_weights
        )
        pruned, mask, dampening = result.weight, result.mask, result.dampening
    else:
        if config.method == "wanda":
            mask = wanda_mask(weight, stats.input_norms(), config.level, config.pattern)
        else:
            mask = magnitude_mask(weight, config.level, config.pattern)
        pruned = weight.float() * mask
    error = relative_error(weight, pruned, hessian)
    return layer.write(pruned.to(weight.dtype), mask), LayerReport(layer.name, error, dampening)


@torch.no_grad()
def prune_model(
    model: nn.Module, tokens: torch.Tensor, config: PruneConfig, device: str | torch.device = "cpu"
) -> PruneResult:
    """Prune the selected linear weights of `model` in place, block by block, on calibration `tokens`.

    Args:
        model: our GPT or a Hugging Face GPT-2 / Llama-family causal LM.
        tokens: calibration token ids, (N, T).
        config: method, target (`level`, `pattern`), `param_filter`, SparseGPT knobs and `batch_size`.
        device: where each block and its statistics are computed; every block returns where it was.

    Returns:
        The masks and per-layer reports; pruned weights are exact zeros in `model`.

    Raises:
        ValueError: the filter selects no linear weight inside the transformer blocks.
    """
    model.eval()
    device = torch.device(device)
    _, blocks = find_blocks(model)
    layers = select_layers(model, config.filters)
    total = sum(len(block_layers) for block_layers in layers)
    if total == 0:
        raise ValueError(f"param_filter {config.filters} selects no linear weight inside the transformer blocks")
    inputs = [batch.to(device) for batch in capture_block_inputs(model, tokens, config.batch_size)]
    masks, reports = {}, []
    with tqdm(total=total, desc=f"prune {config.tag}", unit="layer") as bar:
        for index, (block, block_layers) in enumerate(zip(blocks, layers, strict=True)):
            home = next(block.parameters()).device
            block.to(device)
            stats = {layer.name: InputStats(layer.in_features) for layer in block_layers}
            handles = [
                layer.module.register_forward_hook(lambda m, args, out, s=stats[layer.name]: s.add(args[0]))
                for layer in block_layers
            ]
            try:
                for batch in inputs if block_layers else []:
                    batch.run(block)
            finally:
                for handle in handles:
                    handle.remove()
            for layer in block_layers:
                mask, report = prune_layer(layer, stats.pop(layer.name), config)
                masks[layer.name] = mask.cpu()
                reports.append(report)
                bar.set_postfix_str(f"{layer.name} rel. error {report.error:.4f}", refresh=False)
                bar.update()
            if index < len(blocks) - 1:
                for batch in inputs:
                    batch.hidden = batch.run(block)
            block.to(home)
    return PruneResult(masks, reports)

"""`modelzoo prune`: check the config, load the model and calibration data, prune block by block, write HF.

Every check that needs no compute runs first (config values, then the filter, N:M shapes and sequence length
against the loaded model, then the size of the calibration set), so a bad input fails before pruning starts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from modelzoo.config import Config
from modelzoo.config.prune import PruneConfig
from modelzoo.config.train import resolved_device
from modelzoo.data.corpus import load_corpus
from modelzoo.errors import ConfigError
from modelzoo.export.hf import BY_MODEL_TYPE
from modelzoo.prune.calibration import calibration_tokens
from modelzoo.prune.io import load_source, save_pruned
from modelzoo.prune.layers import select_layers
from modelzoo.prune.sequential import PruneResult, prune_model
from modelzoo.validate import validated_config

log = logging.getLogger(__name__)


@dataclass
class PruneSummary:
    source: Path
    output_dir: Path
    result: PruneResult
    seconds: float
    importable: bool  # the output is a GPT-2 or Llama directory, which `modelzoo pretrain task.init_from` reads

    def format(self, task: PruneConfig) -> str:
        errors = [layer.error for layer in self.result.layers]
        lines = [
            f"pruned {self.source} -> {self.output_dir}",
            f"{task.tag}: {len(errors)} tensors, {self.result.sparsity:.1%} zeros, relative reconstruction error "
            f"mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f} ({self.seconds:.1f} s)",
        ]
        if self.importable:
            lines.append(
                f"sparse continued pre-training: modelzoo pretrain task.init_from={self.output_dir} "
                f"sparsity.sparsity={self.result.sparsity:.2f} sparsity.init_method=from_weights "
                f"run_dir={self.output_dir}-continued"
            )
        return "\n".join(lines)


def check_model(model: nn.Module, task: PruneConfig, seq_len: int) -> None:
    """What the loaded model must satisfy: the filter selects a block linear, N:M divides its inputs, and the
    calibration sequences fit its positions."""
    try:
        layers = [layer for block in select_layers(model, task.filters) for layer in block]
    except ValueError as e:
        raise ConfigError("task.hf_dir", str(e)) from e
    if not layers:
        raise ConfigError(
            "task.param_filter",
            f"{task.filters} selects no linear weight inside the transformer blocks; names look like "
            "'transformer.h.0.mlp.c_fc.weight' (GPT-2; Cerebras spellings work too) or "
            "'model.layers.0.mlp.down_proj.weight' (Llama); null selects the default (every block matrix)",
        )
    if task.pattern is not None:
        m = task.pattern[1]
        for layer in layers:
            if layer.in_features % m:
                raise ConfigError("task.n_m", f"{layer.name} has {layer.in_features} inputs, not divisible by m={m}")
        if task.method == "sparsegpt" and task.block_size % m:
            raise ConfigError("task.block_size", f"{task.block_size} must be a multiple of m={m} for N:M SparseGPT")
    config = model.config
    positions = config.max_position_embeddings if isinstance(model, PreTrainedModel) else config.n_positions
    if seq_len > positions:
        raise ConfigError("data.seq_len", f"{seq_len} exceeds the model's {positions} positions")


def run(cfg: Config) -> PruneSummary:
    """Prune the model `cfg.task` names with calibration data from `cfg.data`; write the HF directory."""
    task: PruneConfig = cfg.task
    device = resolved_device(task.device)
    source = load_source(task, cfg.run_dir, cfg.tokenizer)
    check_model(source.model, task, cfg.data.seq_len)
    corpus = load_corpus(cfg.data, source.tokenizer)
    where = ", ".join(cfg.data.train_files) or f"{cfg.data.hub_name}[{cfg.data.train_split}]"
    tokens = calibration_tokens(corpus.train, task.calibration_samples, cfg.seed, where)
    log.info("pruning %s: %s on %d x %d calibration tokens on %s", source.path, task.tag, *tokens.shape, device)
    start = time.perf_counter()
    result = prune_model(source.model, tokens, task, device)
    seconds = time.perf_counter() - start
    info = {
        **task.summary(),
        "source": str(source.path),
        "seed": cfg.seed,
        "reconstruction_error": {layer.name: layer.error for layer in result.layers},
    }
    retried = {layer.name: layer.dampening for layer in result.layers if (layer.dampening or 0) > task.dampening}
    if retried:
        info["dampening_retried"] = retried
    output = Path(task.output_dir) if task.output_dir else source.default_output
    save_pruned(source.model, output, source.tokenizer, result.masks, info)
    hf = isinstance(source.model, PreTrainedModel)
    importable = not hf or source.model.config.model_type in BY_MODEL_TYPE
    return PruneSummary(source.path, output, result, seconds, importable)


def main(overrides: list[str]) -> None:
    cfg = validated_config(overrides, "prune")
    print(run(cfg).format(cfg.task))

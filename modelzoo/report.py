"""Human-readable model facts for `modelzoo info`."""

from __future__ import annotations

import torch

from modelzoo.models.registry import ModelConfig, build_model
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.masks import num_kept
from modelzoo.sparsity.plan import plan_groups, target_levels


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Counts by kind, from a model built on the meta device (no memory, no compute); an untied LM head counts as
    an embedding (a vocabulary-sized matrix, outside the blocks)."""
    with torch.device("meta"):
        model = build_model(config)
    embeddings = {*model.EMBEDDINGS, "lm_head.weight"}
    counts = {"block matrices": 0, "biases and norms": 0, "embeddings": 0}
    for name, p in model.named_parameters():
        kind = "embeddings" if name in embeddings else "block matrices" if p.ndim == 2 else "biases and norms"
        counts[kind] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def format_model_info(config: ModelConfig, sparsity: SparsityConfig) -> str:
    c = parameter_counts(config)
    heads = f"{config.n_head} heads" + (f" ({config.n_kv_head} key/value)" if config.n_kv_head != config.n_head else "")
    lines = [
        f"model {config.name} ({config.family}): {config.n_layer} layers, d_model {config.n_embd}, {heads}, "
        f"ffn {config.n_inner}, context {config.n_positions}, vocab {config.vocab_size}",
        f"  non-embedding weight matrices (the papers' count)          {c['block matrices'] / 1e6:>12,.1f}M",
        f"  biases and norm parameters                                 {c['biases and norms'] / 1e6:>12,.1f}M",
        f"  embeddings (token, LM head, positions; tied counted once)  {c['embeddings'] / 1e6:>12,.1f}M",
        f"  total                                                      {c['total'] / 1e6:>12,.1f}M",
    ]
    if sparsity.enabled:
        with torch.device("meta"):
            model = build_model(config)
        params = dict(model.named_parameters())
        levels = target_levels(sparsity, model)
        for plan in plan_groups(sparsity, model):
            group = plan.config
            targeted = sum(params[n].numel() for n in plan.names)
            kept = sum(num_kept(params[n].numel(), levels[n]) for n in plan.names)
            where = "" if sparsity.groups is None else f"{plan.key} "
            nm = "" if group.pattern is None else f" {group.pattern.n}:{group.pattern.m}"
            lines.append(
                f"{where}sparsity {group.final_level():.0%}{nm} ({group.algorithm}, {group.distribution}): "
                f"{len(plan.names)} tensors, {targeted / 1e6:,.1f}M weights -> {kept / 1e6:,.1f}M nonzero"
            )
    return "\n".join(lines)

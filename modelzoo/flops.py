"""Training FLOP accounting, dense and sparse-effective, from the config alone.

Counting convention (Hoffmann et al. 2022, appendix F; the one that reproduces SPDF's 2.5x for GPT-3 XL at
75% sparsity): per token and layer, every weight matrix W (in x out) costs 2 * in * out forward FLOPs,
scaled by its density when sparse; attention scores (Q K^T) and the weighted sum (A V) cost
2 * n_ctx * d_model each and are always dense; the tied LM head costs 2 * d_model * vocab, dense.
Training is 3x forward (the backward pass computes input and weight gradients, each as costly as the
forward; sparse hardware such as the CS-2 skips the zeros in both). Norms, softmax, GELU and the
embedding lookup are left out (well under 1% at these sizes).

Sparse weights are charged at their group's target level (`SparsityGroupConfig.final_level`): a constant
as given; a schedule at its last mask update (the level the model trains at from then on); an N:M pattern at
density N/M; with `distribution: erk`, at each tensor's own level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plan import target_levels

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)
COMPONENTS = {
    "attn.c_attn.weight": "attention qkv",
    "attn.c_proj.weight": "attention out",
    "mlp.c_fc.weight": "mlp in",
    "mlp.c_proj.weight": "mlp out",
}


@dataclass(frozen=True)
class FlopTerm:
    """One component's forward FLOPs per token, dense and with sparsity applied."""

    name: str
    dense: float
    sparse: float


@dataclass(frozen=True)
class FlopReport:
    """`sparsity`: fraction of zeros over all sparse weights at their target levels; `scheduled`: whether
    some level comes from a schedule (and so holds only after its last mask update)."""

    model: str
    seq_len: int
    sparsity: float
    terms: tuple[FlopTerm, ...]
    scheduled: bool = False

    @property
    def dense_per_token(self) -> float:
        """Training FLOPs per token of the dense model."""
        return TRAIN_MULTIPLIER * sum(t.dense for t in self.terms)

    @property
    def sparse_per_token(self) -> float:
        """Training FLOPs per token that a sparsity-aware machine executes."""
        return TRAIN_MULTIPLIER * sum(t.sparse for t in self.terms)

    @property
    def reduction(self) -> float:
        """How many times fewer training FLOPs the sparse model needs (dense / sparse)."""
        return self.dense_per_token / self.sparse_per_token


def flop_report(config: GPTConfig, seq_len: int, sparsity: SparsityConfig | None = None) -> FlopReport:
    """Forward FLOPs per token by component, each sparse weight at its group's target level."""
    enabled = sparsity is not None and sparsity.enabled
    with torch.device("meta"):
        model = GPT(config)
    levels = target_levels(sparsity, model) if enabled else {}
    params = dict(model.named_parameters())
    groups: dict[str, list[float]] = {}
    for name, p in params.items():
        component = next((c for suffix, c in COMPONENTS.items() if name.endswith(suffix)), None)
        if component is None:
            continue
        dense = 2.0 * p.numel()
        acc = groups.setdefault(component, [0.0, 0.0])
        acc[0] += dense
        acc[1] += dense * (1.0 - levels.get(name, 0.0))
    attention = 2 * 2.0 * config.n_layer * seq_len * config.n_embd  # Q K^T and A V, dense
    head = 2.0 * config.n_embd * config.padded_vocab_size  # tied LM head (padded rows run too), dense unless sparse
    terms = (
        *(FlopTerm(k, v[0], v[1]) for k, v in groups.items()),
        FlopTerm("attention scores", attention, attention),
        FlopTerm("lm head", head, head * (1.0 - levels.get("transformer.wte.weight", 0.0))),
    )
    numel = sum(params[n].numel() for n in levels)
    overall = sum(level * params[n].numel() for n, level in levels.items()) / numel if numel else 0.0
    scheduled = enabled and any(not isinstance(g.sparsity_spec, (int, float)) for _, g in sparsity.group_configs())
    return FlopReport(config.name, seq_len, overall, terms, scheduled)


def format_flops(x: float) -> str:
    """1.23e9 -> '1.23 GFLOP'."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def format_report(report: FlopReport, tokens: int | None = None) -> str:
    """A plain-text table of training FLOPs per token (and in total for `tokens`)."""
    lines = [
        f"training FLOPs, model={report.model} seq_len={report.seq_len} sparsity={report.sparsity:.0%}"
        + (" (scheduled: the level after the last mask update)" if report.scheduled else ""),
        f"{'component':<18}{'dense/token':>14}{'sparse/token':>14}",
    ]
    for t in report.terms:
        d, s = TRAIN_MULTIPLIER * t.dense, TRAIN_MULTIPLIER * t.sparse
        lines.append(f"{t.name:<18}{format_flops(d):>14}{format_flops(s):>14}")
    lines.append(
        f"{'total':<18}{format_flops(report.dense_per_token):>14}{format_flops(report.sparse_per_token):>14}"
        f"   -> {report.reduction:.2f}x fewer FLOPs"
    )
    if tokens is not None:
        lines.append(
            f"{'x ' + f'{tokens:,} tokens':<18}{format_flops(report.dense_per_token * tokens):>14}"
            f"{format_flops(report.sparse_per_token * tokens):>14}"
        )
    return "\n".join(lines)

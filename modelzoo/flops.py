"""Training FLOP accounting, dense and sparse-effective, from the config alone.

Counting convention (Hoffmann et al. 2022, appendix F; the one that reproduces SPDF's 2.5x for GPT-3 XL at
75% sparsity): per token and layer, every weight matrix W (in x out) costs 2 * in * out forward FLOPs,
scaled by its density when sparse; attention scores (Q K^T) and the weighted sum (A V) cost
2 * n_ctx * d_model each and are always dense; the LM head costs 2 * d_model * vocab, dense unless its weight is
sparse. Each family's matrices are counted at their own shapes: Llama's SwiGLU has three (gate, up, down), and its
grouped-query K and V projections are `n_kv_head / n_head` the size of Q.
Training is 3x forward (the backward pass computes input and weight gradients, each as costly as the
forward; sparse hardware such as the CS-2 skips the zeros in both). Norms, softmax, GELU and the
embedding lookup are left out (well under 1% at these sizes).

Over a run of `steps` optimizer steps, each sparse weight is charged at the level its masks hold on each step
(`modelzoo.sparsity.plan.run_levels`): a constant as given; a schedule (GMP) at the level of its last mask update
so far, dense before its first; an N:M pattern at density N/M; with `distribution: erk`, at each tensor's own
level. RigL computes the dense weight gradient on the step before each mask update: that third of the step's
FLOPs is charged dense for its weights. The average over the run is what a sparse run costs and what predicts its
loss (Jin et al., ICLR 2025, "The Journey Matters"); the report also gives what the final masks alone would cost.
Without `steps`, the target masks are charged from the first step (what a fine-tuning run that holds them costs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from modelzoo.models.registry import ModelConfig, build_model
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plan import RunLevels, run_levels

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)
COMPONENTS = {  # weight name suffix (GPT-2's, Llama's) -> component
    "attn.c_attn.weight": "attention qkv",
    "attn.c_proj.weight": "attention out",
    "mlp.c_fc.weight": "mlp in",
    "mlp.c_proj.weight": "mlp out",
    "self_attn.q_proj.weight": "attention qkv",
    "self_attn.k_proj.weight": "attention qkv",
    "self_attn.v_proj.weight": "attention qkv",
    "self_attn.o_proj.weight": "attention out",
    "mlp.gate_proj.weight": "mlp in",
    "mlp.up_proj.weight": "mlp in",
    "mlp.down_proj.weight": "mlp out",
}


@dataclass(frozen=True)
class FlopTerm:
    """One component's forward FLOPs per token: dense, averaged over the run's steps (`sparse`) and at the final
    masks (`final`); `dense_grad`: the training FLOPs per token, averaged over the steps, that RigL's dense weight
    gradients add."""

    name: str
    dense: float
    sparse: float
    final: float
    dense_grad: float = 0.0

    @property
    def train_sparse(self) -> float:
        """Training FLOPs per token over the run, on a sparsity-aware machine."""
        return TRAIN_MULTIPLIER * self.sparse + self.dense_grad


@dataclass(frozen=True)
class FlopReport:
    """`steps`: the run length integrated over (None: the target masks from the first step);
    `average_sparsity` / `final_sparsity`: fraction of zeros over all sparse weights, averaged over the steps / at
    the end."""

    model: str
    seq_len: int
    steps: int | None
    average_sparsity: float
    final_sparsity: float
    terms: tuple[FlopTerm, ...]

    @property
    def dense_per_token(self) -> float:
        """Training FLOPs per token of the dense model."""
        return TRAIN_MULTIPLIER * sum(t.dense for t in self.terms)

    @property
    def sparse_per_token(self) -> float:
        """Training FLOPs per token that a sparsity-aware machine executes, averaged over the run."""
        return sum(t.train_sparse for t in self.terms)

    @property
    def final_per_token(self) -> float:
        """Training FLOPs per token at the final masks alone (what every step would cost at the final level)."""
        return TRAIN_MULTIPLIER * sum(t.final for t in self.terms)

    @property
    def reduction(self) -> float:
        """How many times fewer training FLOPs the sparse run needs (dense / sparse, over the run)."""
        return self.dense_per_token / self.sparse_per_token

    @property
    def final_reduction(self) -> float:
        """dense / sparse at the final masks alone."""
        return self.dense_per_token / self.final_per_token

    @property
    def varies(self) -> bool:
        """Whether the run's average differs from its final level (a schedule, a dense start, RigL's gradients)."""
        return not math.isclose(self.sparse_per_token, self.final_per_token, rel_tol=1e-9)


def flop_report(
    config: ModelConfig, seq_len: int, sparsity: SparsityConfig | None = None, steps: int | None = None
) -> FlopReport:
    """Forward FLOPs per token by component over a run of `steps` optimizer steps (see the module docstring)."""
    enabled = sparsity is not None and sparsity.enabled
    with torch.device("meta"):
        model = build_model(config)
    levels = run_levels(sparsity, model, steps) if enabled else RunLevels({}, {}, {})
    params = dict(model.named_parameters())
    groups: dict[str, list[float]] = {}
    for name, p in params.items():
        component = next((c for suffix, c in COMPONENTS.items() if name.endswith(suffix)), None)
        if component is None:
            continue
        dense = 2.0 * p.numel()
        acc = groups.setdefault(component, [0.0, 0.0, 0.0, 0.0])
        acc[0] += dense
        acc[1] += dense * (1.0 - levels.average.get(name, 0.0))
        acc[2] += dense * (1.0 - levels.final.get(name, 0.0))
        acc[3] += dense * levels.dense_grad.get(name, 0.0)  # the weight gradient, dense where the masks prune
    attention = 2 * 2.0 * config.n_layer * seq_len * config.n_embd  # Q K^T and A V, dense
    head = 2.0 * config.n_embd * config.padded_vocab_size  # LM head (padded rows run too), dense unless sparse
    wte = next(n for n, p in params.items() if p is model.lm_head.weight)  # the embedding's name where tied
    terms = (
        *(FlopTerm(k, *v) for k, v in groups.items()),
        FlopTerm("attention scores", attention, attention, attention),
        FlopTerm(
            "lm head",
            head,
            head * (1.0 - levels.average.get(wte, 0.0)),
            head * (1.0 - levels.final.get(wte, 0.0)),
            head * levels.dense_grad.get(wte, 0.0),
        ),
    )
    numel = sum(params[n].numel() for n in levels.final)

    def overall(per_tensor: dict[str, float]) -> float:
        return sum(level * params[n].numel() for n, level in per_tensor.items()) / numel if numel else 0.0

    return FlopReport(config.name, seq_len, steps, overall(levels.average), overall(levels.final), terms)


def format_flops(x: float) -> str:
    """1.23e9 -> '1.23 GFLOP'."""
    for unit, scale in (
        ("ZFLOP", 1e21),
        ("EFLOP", 1e18),
        ("PFLOP", 1e15),
        ("TFLOP", 1e12),
        ("GFLOP", 1e9),
        ("MFLOP", 1e6),
    ):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def format_report(report: FlopReport, tokens: int | None = None) -> str:
    """A plain-text table of training FLOPs per token (and in total for `tokens`); where the run's average level
    differs from its final one, a column for the final masks alone and both reductions."""
    over = "" if report.steps is None else f" over {report.steps:,} steps"
    if math.isclose(report.average_sparsity, report.final_sparsity, abs_tol=1e-12):
        level = f"sparsity={report.final_sparsity:.0%}"
    else:
        level = f"sparsity {report.average_sparsity:.1%} on average, {report.final_sparsity:.1%} at the end"
    if any(t.dense_grad for t in report.terms):
        level += ", dense weight gradients on the step before each RigL mask update"
    columns = [("dense/token", TRAIN_MULTIPLIER, "dense"), ("sparse/token", 1, "train_sparse")]
    if report.varies:
        columns.append(("final/token", TRAIN_MULTIPLIER, "final"))
    lines = [
        f"training FLOPs, model={report.model} seq_len={report.seq_len}{over}, {level}",
        f"{'component':<18}" + "".join(f"{title:>14}" for title, _, _ in columns),
    ]
    for t in report.terms:
        lines.append(f"{t.name:<18}" + "".join(f"{format_flops(k * getattr(t, f)):>14}" for _, k, f in columns))
    totals = [report.dense_per_token, report.sparse_per_token, report.final_per_token][: len(columns)]
    verdict = f"   -> {report.reduction:.2f}x fewer FLOPs"
    if report.varies:
        verdict += f" over the run ({report.final_reduction:.2f}x at the final level alone)"
    lines.append(f"{'total':<18}" + "".join(f"{format_flops(x):>14}" for x in totals) + verdict)
    if tokens is not None:
        lines.append(f"{'x ' + f'{tokens:,} tokens':<18}" + "".join(f"{format_flops(x * tokens):>14}" for x in totals))
    return "\n".join(lines)


def iso_flop_steps(config: ModelConfig, seq_len: int, sparsity: SparsityConfig, dense_steps: int) -> int:
    """The fewest steps whose sparse-effective training FLOPs reach those of `dense_steps` dense steps of the same
    batch (the iso-FLOP run length: a 75% sparse run trains about 2.5x longer at GPT-3 XL size)."""
    if not sparsity.enabled:
        return dense_steps
    budget = flop_report(config, seq_len).dense_per_token * dense_steps

    def spent(steps: int) -> float:
        return flop_report(config, seq_len, sparsity, steps).sparse_per_token * steps

    low, high = dense_steps, dense_steps  # spent() grows with the steps; spent(dense_steps) <= budget
    while spent(high) < budget:
        low, high = high, high * 2
    while low < high:  # the first step count in (low, high] that reaches the budget
        middle = (low + high) // 2
        low, high = (middle + 1, high) if spent(middle) < budget else (low, middle)
    return high

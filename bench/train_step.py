"""Benchmark one fp32 training step on CPU: ours vs HF (GPT-2, Llama), masked-dense 75% vs dense, each algorithm.

What is measured is in `METHOD`, which also heads the section this writes to `docs/benchmarks.md`.
Usage: `python bench/train_step.py [--models tiny,med2,llama_tiny,llama1b2] [--write]`; see `--help`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import (
    Shape,
    Timing,
    add_common_arguments,
    begin,
    markdown_table,
    model_size,
    publish,
    split_choices,
    time_interleaved,
)

from modelzoo.config.train import OptimConfig
from modelzoo.export.hf import hf_model_class, to_hf_config
from modelzoo.models.registry import ModelConfig, build_model
from modelzoo.optim import build_optimizer
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity

METHOD = """\
A step is `zero_grad`, forward with loss, backward and an AdamW step (the trainer's `build_optimizer` with
the default `OptimConfig`; no gradient clipping), fp32, on the same random batch for every variant.
Variants, built from the same seed:
- HF: `transformers.GPT2LMHeadModel` or `LlamaForCausalLM` of the same shape (`to_hf_config`, SDPA
  attention), loss as HF computes it, `model(input_ids=x, labels=x, use_cache=False)`;
- ours, dense: our `GPT` or `Llama`, loss as `model(x, targets)`;
- ours, masked-dense: ours with `MaskedSparsity` at 75% (the default parameter selection: the block
  matrices): gradient hooks, optimizer-state masking before and re-pruning after each AdamW step;
- ours, GMP / SET / RigL: the same at 75% (GMP pruning on from 75% toward 80%), each timed twice: on steps
  that update no mask, and with every step a mask-update step (SET and RigL: drop fraction 0.3; RigL also
  keeps the step's dense gradient). Their step time at an update frequency F is the amortised
  `other + (update - other) / F`, reported for F = 100 (Cerebras' GPT-3 RigL recipe).

Both models run the network on the same T tokens per sequence. HF shifts the labels inside, so its loss
averages over T - 1 positions per sequence (the last is ignored) where ours averages over T; logits and
cross-entropy are computed for all T positions in both, so the work is the same. Variants are timed in
interleaved rounds (A B C A B C ...); each sample is the mean of the round's steps, and tokens/s is taken
from the median sample.
"""
SECTION = "Training step: ours vs HF GPT-2 and Llama, masked-dense 75% vs dense (bench/train_step.py)"
SPARSITY = 0.75
OPTIM = OptimConfig()
UPDATE_FREQ = 100  # mask updates amortised at Cerebras' GPT-3 125M RigL recipe frequency
# Each dynamic algorithm's sparsity keys but `update`: timed with updates on no step and on every step.
DYNAMIC = {
    "gmp": {"sparsity": {"type": "exp", "init": SPARSITY, "gamma": -1e-3, "final": 0.8}, "algorithm": "gmp"},
    "set": {"sparsity": SPARSITY, "algorithm": "set"},
    "rigl": {"sparsity": SPARSITY, "algorithm": "rigl"},
}
NAMES = {"gmp": "GMP", "set": "SET", "rigl": "RigL"}
NO_UPDATES, EVERY_STEP = {"steps": [0]}, {"freq": 1}  # step 0 only (the initial masks), or every step
BASE_VARIANTS = ("hf", "ours", "ours_masked75")
VARIANTS = (*BASE_VARIANTS, *(f"{a}{u}" for a in DYNAMIC for u in ("", "_update")))
LABELS = {
    "hf": "HF {hf} (sdpa), dense",
    "ours": "ours, dense",
    "ours_masked75": f"ours, masked-dense {SPARSITY:.0%} static",
    **{a: f"ours, {NAMES[a]}, a step without mask update" for a in DYNAMIC},
    **{f"{a}_update": f"ours, {NAMES[a]}, a mask-update step" for a in DYNAMIC},
}


SHAPES = {
    "tiny": Shape(model_size("tiny"), batch=16, seq=128, steps=10),
    "med2": Shape(
        model_size("med", name="med2", n_layer=2),
        batch=4,
        seq=256,
        steps=1,
        note="GPT-3 Medium width with 2 of its 24 layers, so that a step takes seconds on a 2-core CPU. Each layer "
        "costs what it does in GPT-3 Medium, but the tied 50257-token embedding and LM head take a much larger "
        "share of the step than in the full-depth model.",
    ),
    "llama_tiny": Shape(model_size("llama_tiny"), batch=16, seq=128, steps=10),
    "llama1b2": Shape(
        model_size("llama3_1b", name="llama1b2", n_layer=2, vocab_size=32000),
        batch=2,
        seq=256,
        steps=1,
        variants=BASE_VARIANTS,
        note="Llama-3.2-1B (2048 wide, 32 query and 8 key/value heads, SwiGLU 8192, tied embeddings) with 2 of its "
        "16 layers and Llama-2's 32,000-token vocabulary instead of Llama-3's 128,256, so that three models with "
        "their AdamW state fit in memory and a step takes seconds on a 2-core CPU. Timed without the dynamic "
        "algorithms (the tiny shapes measure their overhead).",
    ),
}


def timed_variants(shape: Shape) -> tuple[str, ...]:
    """The variants timed on `shape`: its own list, or every one."""
    return shape.variants or VARIANTS


def _step_fn(optimizer: torch.optim.Optimizer, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step


def training_steps(shape: Shape, seed: int = 0) -> dict[str, Callable[[], None]]:
    """One training-step function per variant in `shape.variants`, on one shared random batch."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(shape.model.vocab_size, (shape.batch, shape.seq + 1), generator=generator)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) each

    torch.manual_seed(seed)
    hf = hf_model_class(shape.model)(to_hf_config(shape.model)).train()
    hf.set_attn_implementation("sdpa")
    steps = {"hf": _step_fn(build_optimizer(hf, OPTIM), lambda: hf(input_ids=x, labels=x, use_cache=False).loss)}

    torch.manual_seed(seed)
    ours = build_model(shape.model).train()
    steps["ours"] = _step_fn(build_optimizer(ours, OPTIM), lambda: ours(x, y)[1])

    steps["ours_masked75"] = _sparse_step_fn(shape.model, SparsityConfig(sparsity=SPARSITY), x, y, seed)
    for name, keys in DYNAMIC.items():
        for suffix, update in (("", NO_UPDATES), ("_update", EVERY_STEP)):
            if name + suffix in timed_variants(shape):
                sparsity = SparsityConfig(**keys, update=update)
                steps[name + suffix] = _sparse_step_fn(shape.model, sparsity, x, y, seed)
    return steps


def _sparse_step_fn(
    config: ModelConfig, sparsity: SparsityConfig, x: torch.Tensor, y: torch.Tensor, seed: int
) -> Callable[[], None]:
    """A training step of our model with `MaskedSparsity(sparsity)` on it and AdamW."""
    torch.manual_seed(seed)
    model = build_model(config).train()
    plugin = MaskedSparsity(sparsity, seed=seed)
    plugin.apply(model)
    optimizer = build_optimizer(model, OPTIM)
    plugin.apply_optimizer(optimizer)
    return _step_fn(optimizer, lambda: model(x, y)[1])


def amortised(timings: dict[str, Timing], algorithm: str, freq: int = UPDATE_FREQ) -> float:
    """Seconds per step of `algorithm` when one step in `freq` updates masks (medians of both kinds of step)."""
    other, update = timings[algorithm].median, timings[f"{algorithm}_update"].median
    return other + (update - other) / freq


def measure(shape: Shape, *, steps: int, warmup: int, repeats: int, seed: int = 0) -> dict[str, Timing]:
    """Seconds per training step of each variant: `repeats` interleaved rounds of `steps` steps, after `warmup`."""
    return time_interleaved(training_steps(shape, seed), warmup=warmup, repeats=repeats, number=steps)


def report(name: str, shape: Shape, timings: dict[str, Timing], steps: int) -> str:
    """Markdown for one shape: the table of variants and the ratios the benchmark is for."""
    m = shape.model
    tps = {v: shape.tokens / t.median for v, t in timings.items()}
    hf = hf_model_class(m).__name__
    rows = [
        [
            LABELS[v].format(hf=hf),
            f"{t.median * 1e3:.1f}",
            f"{min(t.samples) * 1e3:.1f}-{max(t.samples) * 1e3:.1f}",
            f"{tps[v]:,.0f}",
            f"{tps[v] / tps['ours']:.3f}",
        ]
        for v, t in timings.items()
    ]
    table = markdown_table(["variant", "ms/step (median)", "ms/step (min-max)", "tokens/s", "tokens/s vs ours"], rows)
    overhead = timings["ours_masked75"].median / timings["ours"].median - 1
    spread = max(max(t.samples) / min(t.samples) - 1 for t in timings.values())
    lines = [
        f"### {name}: {m.family}, n_layer {m.n_layer}, n_embd {m.n_embd}, n_head {m.n_head}, "
        f"n_kv_head {m.n_kv_head}, n_inner {m.n_inner}, vocab {m.vocab_size}; "
        f"batch {shape.batch} x seq {shape.seq} = {shape.tokens} tokens/step",
        "",
        *([shape.note, ""] if shape.note else []),
        f"{len(next(iter(timings.values())).samples)} interleaved rounds of {steps} step(s) per variant.",
        "",
        table,
        "",
        f"- ours / HF {hf} tokens/s: **{tps['ours'] / tps['hf']:.3f}x** (target >= 1)",
        f"- masked-dense {SPARSITY:.0%} step-time overhead vs dense: **{overhead:+.1%}** (target <= +5%)",
    ]
    timed = [a for a in DYNAMIC if a in timings]
    if "rigl" in timed:
        rigl = amortised(timings, "rigl") / timings["ours"].median - 1
        lines.append(
            f"- RigL step-time overhead vs dense at update.freq {UPDATE_FREQ}: **{rigl:+.1%}** (target <= +10%)"
        )
    lines.append(
        f"- largest spread of one variant's samples (max/min - 1): {spread:.1%}; smaller differences are noise"
    )
    if timed:
        lines += [
            "",
            f"Dynamic algorithms at {SPARSITY:.0%}, mask updates amortised at update.freq {UPDATE_FREQ}:",
            "",
            dynamic_table(timings, timed),
        ]
    return "\n".join(lines)


def dynamic_table(timings: dict[str, Timing], algorithms: list[str]) -> str:
    """Step times of the dynamic `algorithms` without and with a mask update, amortised, and against dense."""
    dense = timings["ours"].median
    rows = [
        [
            NAMES[a],
            f"{timings[a].median * 1e3:.1f}",
            f"{timings[f'{a}_update'].median * 1e3:.1f}",
            f"{amortised(timings, a) * 1e3:.1f}",
            f"{amortised(timings, a) / dense - 1:+.1%}",
        ]
        for a in algorithms
    ]
    header = [
        "algorithm",
        "ms/step without update",
        "ms/step with update",
        f"ms/step at update.freq {UPDATE_FREQ}",
        "overhead vs dense",
    ]
    return markdown_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default=",".join(SHAPES),
        help=f"comma-separated shapes out of {sorted(SHAPES)} (default: all)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="timed steps per variant per round (default: per shape, 10 for the tiny ones, 1 for the others)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing (default: 2)")
    add_common_arguments(parser, repeats=5, seeded="weights, masks and the batch")
    args = parser.parse_args(argv)
    args.models = split_choices(parser, "--models", args.models, list(SHAPES))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = begin(args.threads)
    parts = [METHOD.strip()]
    for name in args.models:
        shape = SHAPES[name]
        steps = args.steps or shape.steps
        timings = measure(shape, steps=steps, warmup=args.warmup, repeats=args.repeats, seed=args.seed)
        parts.append(report(name, shape, timings, steps))
        print(parts[-1], "\n", flush=True)
    publish(SECTION, "\n\n".join(parts), env, args.write)


if __name__ == "__main__":
    main()

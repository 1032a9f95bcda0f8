"""Benchmark one sparse Linear layer on CPU: torch.sparse CSR/BSR vs dense kernels, GPT-3 Medium and XL shapes.

What is measured is in `METHOD`, which also heads the section this writes to `docs/benchmarks.md`.
Usage: `python bench/sparse_gemm.py [--models med,xl] [--tokens 1,16,512] [--sparsity 0.5,0.75,0.9] [--write]`.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from common import Timing, add_common_arguments, begin, markdown_table, publish, split_choices, time_interleaved

from modelzoo.backends.torch_sparse import SparseLinear, bsr_from_mask, csr_from_mask

METHOD = """\
One `nn.Linear` weight of shape (out, in), fp32, multiplied by M tokens of input (M = 1 is batch-1
decoding, 512 a training micro-batch), for the four matrices of a GPT-3 block (d_model d: attention
`c_attn` d -> 3d, `c_proj` d -> d, MLP `c_fc` d -> 4d, `c_proj` 4d -> d). Kernels:
- dense `F.linear(x, W)`: what `nn.Linear` (and masked-dense) runs;
- dense `x @ Wt`: `torch.mm` on a pre-transposed contiguous (in, out) copy of W;
- dense numpy: `x @ Wt` on numpy arrays (numpy's own OpenBLAS with its own thread pool, all cores
  whatever `--threads` says), timed right after the others rather than interleaved with them (OpenBLAS's
  threads spin ~0.1 s after each call, which would slow the next kernel timed);
- CSR: the `torch_sparse` backend's kernel (`SparseLinear`) with int32 indices: `torch.mv(W_csr, x)` for
  M = 1, `(W_csr @ x.T).T` above; pattern from a random unstructured mask at the given sparsity;
- BSR: the same with 32 x 32 blocks and a random *block* mask at the given sparsity (a random unstructured
  mask occupies every block, so BSR only applies to block-shaped masks).

Every kernel cycles through copies of its weight (different random matrices; by default >= 128 MiB of
dense weights in all, 4x this CPU's L3 cache), one per call, so that weights stream from memory as they
do in a forward pass; a single matrix called again and again (`--stream-mib 0`) stays in cache, which
flatters whichever kernel is bound by memory traffic (the dense ones at small M).

Sparse cells read `a / b`: speed-up vs `F.linear` / vs the fastest of the three dense kernels, all
measured in the same interleaved rounds (A B C ... A B C ...); the column header gives the FLOP limit
1 / (1 - s) (int32 CSR moves 8 bytes per kept weight against 4 per dense weight, so where memory traffic
bounds the kernels the limit is 1 / (2 (1 - s)): 2x at 75%). Each sample is the mean of `number` calls,
chosen so that one `F.linear` sample lasts >= 20 ms; medians are reported.
"""
SECTION = "Sparse GEMM: torch.sparse CSR/BSR vs dense, one Linear layer (bench/sparse_gemm.py)"
WIDTHS = {"med": 1024, "xl": 2048}
LAYERS = {"c_attn": (3, 1), "attn.c_proj": (1, 1), "c_fc": (4, 1), "mlp.c_proj": (1, 4)}  # (out, in) / d
DENSE = {"F.linear": "dense `F.linear`", "x@Wt": "dense `x @ Wt`", "numpy": "dense numpy"}
BLOCK = 32
MIN_SAMPLE_S = 0.02
OPENBLAS_SPIN_S = 0.2
STREAM_BYTES = 128 << 20  # dense weights each kernel cycles through: 4x this CPU's 32 MiB L3 cache


@dataclass(frozen=True)
class Case:
    """One layer shape at one token count."""

    model: str
    layer: str
    out_features: int
    in_features: int
    tokens: int


def cases(models: list[str], tokens: list[int]) -> list[Case]:
    return [
        Case(model, layer, out * WIDTHS[model], inp * WIDTHS[model], m)
        for model in models
        for m in tokens
        for layer, (out, inp) in LAYERS.items()
    ]


def random_mask(shape: tuple[int, int], sparsity: float, generator: torch.Generator, block: int = 1) -> torch.Tensor:
    """Exactly round((1 - sparsity) * blocks) kept `block` x `block` blocks, at random positions."""
    rows, cols = shape[0] // block, shape[1] // block
    kept = torch.zeros(rows * cols, dtype=torch.bool)
    kept[torch.randperm(rows * cols, generator=generator)[: round((1 - sparsity) * rows * cols)]] = True
    return kept.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)


def _round_robin(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One call of the next function in turn."""
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def kernels(
    case: Case, sparsities: list[float], seed: int = 0, stream_bytes: int = STREAM_BYTES
) -> dict[str, Callable[[], object]]:
    """One call per kernel: the dense ones (`DENSE`) and `csr <s>` / `bsr <s>` for each sparsity.

    Each kernel cycles through random weights of the layer's shape, at least `stream_bytes` of dense
    weights in all, so that its weights come from memory as in a forward pass, not from the cache.
    """
    generator = torch.Generator().manual_seed(seed)
    copies = max(1, -(-stream_bytes // (case.out_features * case.in_features * 4)))
    x = torch.randn(case.tokens, case.in_features, generator=generator)
    x_np = x.numpy()
    variants: dict[str, list[Callable[[], object]]] = defaultdict(list)
    for _ in range(copies):
        weight = torch.randn(case.out_features, case.in_features, generator=generator)
        wt = weight.t().contiguous()
        wt_np = wt.numpy()
        variants["F.linear"].append(lambda w=weight: F.linear(x, w))
        variants["x@Wt"].append(lambda w=wt: x @ w)
        variants["numpy"].append(lambda w=wt_np: x_np @ w)
        for s in sparsities:
            csr = SparseLinear(csr_from_mask(weight, random_mask(weight.shape, s, generator)), None, "csr")
            block_mask = random_mask(weight.shape, s, generator, BLOCK)
            bsr = SparseLinear(bsr_from_mask(weight, block_mask, BLOCK), None, "bsr")
            variants[f"csr {s}"].append(lambda layer=csr: layer(x))
            variants[f"bsr {s}"].append(lambda layer=bsr: layer(x))
    return {name: _round_robin(fns) for name, fns in variants.items()}


def measure(
    case: Case, sparsities: list[float], *, repeats: int, seed: int = 0, stream_bytes: int = STREAM_BYTES
) -> dict[str, Timing]:
    """Seconds per call of every kernel, in `repeats` interleaved rounds after one warm-up call each.

    numpy is timed right after the torch kernels rather than among them: OpenBLAS's worker threads spin for
    about 0.1 s after each call (its default thread timeout) and would slow whichever kernel ran next.
    """
    fns = kernels(case, sparsities, seed, stream_bytes)
    numpy_fn = fns.pop("numpy")
    probe = time_interleaved({"F.linear": fns["F.linear"]}, warmup=1, repeats=1)["F.linear"].median
    number = max(1, round(MIN_SAMPLE_S / max(probe, 1e-7)))
    timings = time_interleaved(fns, warmup=1, repeats=repeats, number=number)
    timings |= time_interleaved({"numpy": numpy_fn}, warmup=1, repeats=repeats, number=number)
    time.sleep(OPENBLAS_SPIN_S)  # let OpenBLAS's threads go idle before the next case
    return timings


def speedups(timings: dict[str, Timing], kernel: str) -> tuple[float, float]:
    """(speed-up of `kernel` vs F.linear, vs the fastest dense kernel)."""
    fastest_dense = min(timings[d].median for d in DENSE)
    t = timings[kernel].median
    return timings["F.linear"].median / t, fastest_dense / t


def report(model: str, tokens: int, results: dict[Case, dict[str, Timing]], sparsities: list[float]) -> str:
    """Markdown for one (model, M): a row per layer shape."""
    header = [
        "layer (out x in)",
        "`F.linear` ms",
        "fastest dense",
        *(f"CSR {s:.0%} (limit {1 / (1 - s):.1f}x)" for s in sparsities),
        *(f"BSR{BLOCK} {s:.0%}" for s in sparsities),
    ]
    rows = []
    for case, timings in results.items():
        if case.model != model or case.tokens != tokens:
            continue
        fastest = min(DENSE, key=lambda d: timings[d].median)
        cells = [
            f"{case.layer} ({case.out_features} x {case.in_features})",
            f"{timings['F.linear'].median * 1e3:.3f}",
            f"{DENSE[fastest]} {timings[fastest].median * 1e3:.3f} ms",
        ]
        for kind in ("csr", "bsr"):
            cells += ["{:.2f}x / {:.2f}x".format(*speedups(timings, f"{kind} {s}")) for s in sparsities]
        rows.append(cells)
    return f"### {model} (d = {WIDTHS[model]}), M = {tokens} tokens\n\n{markdown_table(header, rows)}"


def summary(results: dict[Case, dict[str, Timing]], sparsity: float, tokens: int) -> str:
    """The issue's check: CSR speed-up range at `sparsity` and M = `tokens` over every measured shape."""
    ratios = [speedups(t, f"csr {sparsity}") for c, t in results.items() if c.tokens == tokens]
    if not ratios:
        return ""
    vs_linear, vs_fastest = zip(*ratios, strict=True)
    return (
        f"- CSR at {sparsity:.0%}, M = {tokens}: **{min(vs_linear):.2f}-{max(vs_linear):.2f}x** vs `F.linear`, "
        f"{min(vs_fastest):.2f}-{max(vs_fastest):.2f}x vs the fastest dense kernel (limit {1 / (1 - sparsity):.1f}x; "
        "target >= 2.5x per GEMM at 75%, M = 1)"
    )


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="med,xl", help=f"comma-separated, out of {sorted(WIDTHS)} (default: med,xl)"
    )
    parser.add_argument("--tokens", type=_int_list, default=[1, 16, 512], help="tokens M per call (default: 1,16,512)")
    parser.add_argument(
        "--sparsity", type=_float_list, default=[0.5, 0.75, 0.9], help="fractions of zeros (default: 0.5,0.75,0.9)"
    )
    parser.add_argument(
        "--stream-mib",
        type=int,
        default=STREAM_BYTES >> 20,
        help=f"MiB of dense weights each kernel cycles through; 0: one hot matrix (default: {STREAM_BYTES >> 20})",
    )
    add_common_arguments(parser, repeats=3, seeded="weights, masks and inputs")
    args = parser.parse_args(argv)
    args.models = split_choices(parser, "--models", args.models, list(WIDTHS))
    if not all(0 <= s < 1 for s in args.sparsity):
        parser.error(f"--sparsity: every value must be in [0, 1), got {args.sparsity}")
    if not all(m >= 1 for m in args.tokens):
        parser.error(f"--tokens: every value must be >= 1, got {args.tokens}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = begin(args.threads)
    results = {}
    for case in cases(args.models, args.tokens):
        results[case] = measure(
            case, args.sparsity, repeats=args.repeats, seed=args.seed, stream_bytes=args.stream_mib << 20
        )
        print(f"measured {case}", flush=True)
    parts = [METHOD.strip(), f"Weights cycled through per kernel: {args.stream_mib} MiB (0: one matrix, hot in cache)."]
    parts += [report(model, m, results, args.sparsity) for model in args.models for m in args.tokens]
    lines = [summary(results, s, m) for s in args.sparsity for m in args.tokens]
    parts.append("\n".join(line for line in lines if line))
    text = "\n\n".join(parts)
    print(text)
    publish(SECTION, text, env, args.write)


if __name__ == "__main__":
    main()

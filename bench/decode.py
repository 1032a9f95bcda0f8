"""Benchmark batch-1 greedy decoding on CPU: a 75%-sparse GPT-3 Medium-shaped model on torch_sparse vs dense.

What is measured is in `METHOD`, which also heads the section this writes to `docs/benchmarks.md`.
Usage: `python bench/decode.py [--layers 24] [--new-tokens 32] [--write]`; see `--help`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import torch
from common import REPO, Timing, add_common_arguments, begin, markdown_table, publish, time_interleaved
from omegaconf import OmegaConf
from torch import nn

from modelzoo.backends.torch_sparse import TorchSparseConverter, kernel_summary
from modelzoo.generate import generate
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity

METHOD = """\
Greedy decoding with the KV cache (`modelzoo.generate.generate`, batch 1, fp32): a random prompt, then
`new_tokens` tokens, no EOS stop. tokens/s = new tokens / median seconds per call (the prompt's prefill
included). Four models of the same GPT-3 Medium shape (d_model 1024, 16 heads, ffn 4096, vocab 50257,
tied LM head), built from one seed:
- dense: our `GPT`;
- masked-dense: the same with `MaskedSparsity` at the given sparsity (static, random, Cerebras' default
  selection: the four matrices of every block; embeddings and the LM head stay dense) - dense kernels
  on weights with exact zeros, i.e. what `backend=masked_dense` runs;
- torch_sparse: the masked-dense model converted by `TorchSparseConverter.convert(model, tokens=1)`
  (each layer shape gets the faster of dense and int32 CSR, timed at M = 1), i.e. what
  `modelzoo generate task.converter=torch_sparse` runs;
- dense, `x @ Wt`: the dense model with every `nn.Linear`, the LM head included, computing
  `addmm(b, x, Wt)` on a pre-transposed contiguous copy of its weight, a dense kernel that beats
  `F.linear` on some shapes here (see the sparse GEMM section): a second dense baseline.

Variants are timed in interleaved rounds. Every timed run also times each part of a decoding step with
forward hooks (about 400 hook calls per token, well under 1 ms, in every variant alike and counted in
"rest"): the four block matrices, the attention core (SDPA and the KV cache), the LayerNorms, the GELU,
the LM head; "rest" is the embedding, residual adds, the arg-max and Python overhead.
"""
SECTION = "Batch-1 decoding: torch_sparse vs dense, GPT-3 Medium shape (bench/decode.py)"
MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def med_config(layers: int) -> GPTConfig:
    """GPT-3 Medium from `conf/model/med.yaml` with `layers` of its 24 blocks."""
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "med.yaml"))
    return GPTConfig(**{**values, "name": f"med{layers}", "n_layer": layers})


class TransposedLinear(nn.Module):
    """`nn.Linear` computed as `addmm(b, x, Wt)` with a pre-transposed contiguous (in, out) weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = linear.weight.detach().t().contiguous()  # (in, out)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], -1)


def pretransposed(model: GPT) -> GPT:
    """A copy of `model` with every `nn.Linear` (the tied LM head included) as a `TransposedLinear`."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_module(leaf, TransposedLinear(module))
    return model


def build_models(config: GPTConfig, sparsity: float, seed: int) -> tuple[dict[str, GPT], str]:
    """The variants of `METHOD`, by name, and the torch_sparse kernel summary."""
    torch.manual_seed(seed)
    dense = GPT(config).eval()
    masked = copy.deepcopy(dense)
    MaskedSparsity(SparsityConfig(sparsity=sparsity), seed=seed).apply(masked)
    backend = TorchSparseConverter()
    converted = backend.convert(copy.deepcopy(masked), tokens=1)
    models = {"dense": dense, "masked-dense": masked, "torch_sparse": converted, "dense, x @ Wt": pretransposed(dense)}
    return models, kernel_summary(backend.choices)


def part_of(name: str) -> str | None:
    """The breakdown category a module's time is summed into (None: not hooked)."""
    leaf = name.rpartition(".")[2]
    if name == "lm_head":
        return "LM head (dense)"
    for matrix in MATRICES:
        if name.endswith(matrix):
            return matrix.split(".")[0] + " matrices"
    if leaf in ("ln_1", "ln_2", "ln_f"):
        return "LayerNorm"
    return leaf if leaf in ("attn", "mlp") else None  # inclusive of their matrices, subtracted below


@torch.inference_mode()
def breakdown(model: GPT, prompt: list[int], new_tokens: int) -> tuple[list[int], dict[str, float]]:
    """Greedy-decode with forward hooks: the tokens, and ms per token spent in each part (see `METHOD`)."""
    totals: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        part = part_of(name)
        if part is not None:
            handles.append(
                module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
            )
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, n=name, p=part: totals.__setitem__(p, totals[p] + time.perf_counter() - starts[n])
                )
            )
    try:
        result = generate(model, prompt, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    parts = {
        "block matrices": totals["attn matrices"] + totals["mlp matrices"],
        "attention core (SDPA, KV cache)": totals["attn"] - totals["attn matrices"],
        "GELU": totals["mlp"] - totals["mlp matrices"],
        "LayerNorm": totals["LayerNorm"],
        "LM head (dense)": totals["LM head (dense)"],
    }
    parts["rest"] = result.prefill_s + result.decode_s - sum(parts.values())
    return result.tokens, {part: seconds * 1e3 / len(result.tokens) for part, seconds in parts.items()}


def measure(
    models: dict[str, GPT], prompt: list[int], new_tokens: int, repeats: int
) -> tuple[dict[str, Timing], dict[str, dict[str, float]], dict[str, list[int]]]:
    """Time `models` decoding in interleaved rounds, after one warm-up run each.

    Returns:
        Seconds per call, the median ms per token of each part (`breakdown`), and the tokens decoded.
    """
    runs: dict[str, list[tuple[list[int], dict[str, float]]]] = defaultdict(list)
    fns = {
        name: lambda n=name, m=model: runs[n].append(breakdown(m, prompt, new_tokens)) for name, model in models.items()
    }
    timings = time_interleaved(fns, warmup=1, repeats=repeats)
    parts = {
        name: {part: statistics.median(r[1][part] for r in rs[1:]) for part in rs[0][1]} for name, rs in runs.items()
    }
    return timings, parts, {name: rs[0][0] for name, rs in runs.items()}


def report(
    config: GPTConfig, timings: dict[str, Timing], parts: dict[str, dict[str, float]], args: argparse.Namespace
) -> str:
    """Markdown: tokens/s per variant, the per-part breakdown, and the ratios the issue asks for."""
    tps = {v: args.new_tokens / t.median for v, t in timings.items()}
    rows = [
        [v, f"{t.median * 1e3 / args.new_tokens:.1f}", f"{tps[v]:.2f}", f"{tps[v] / tps['dense']:.2f}x"]
        for v, t in timings.items()
    ]
    table = markdown_table(["variant", "ms/token (median)", "tokens/s", "vs dense"], rows)
    total = {v: sum(p.values()) for v, p in parts.items()}
    part_rows = [[p, *(f"{parts[v][p]:.1f}" for v in parts)] for p in next(iter(parts.values()))]
    part_table = markdown_table(["ms per token", *parts], [*part_rows, ["sum", *(f"{t:.1f}" for t in total.values())]])
    dense, sparse = parts["dense"], parts["torch_sparse"]
    head = "LM head (dense)"
    without_head = (total["dense"] - dense[head]) / (total["torch_sparse"] - sparse[head])
    # int32 CSR reads 8 bytes per kept weight, dense 4 per weight: where memory traffic bounds both, the block
    # matrices take at best 2 (1 - s) of their dense time, and nothing else gets faster.
    traffic = 2 * (1 - args.sparsity)
    ceiling = total["dense"] / (total["dense"] - dense["block matrices"] * (1 - traffic))
    dense_gb = 4 * config.n_layer * (4 * config.n_embd**2 + 2 * config.n_embd * config.n_inner) / 1e9
    bandwidth = {
        v: gb / parts[v]["block matrices"] * 1e3
        for v, gb in (("dense", dense_gb), ("torch_sparse", dense_gb * traffic))
    }
    spread = max(max(t.samples) / min(t.samples) - 1 for t in timings.values())
    depth = "" if config.n_layer == 24 else f" ({config.n_layer} of GPT-3 Medium's 24 layers)"
    return "\n".join(
        [
            f"### n_layer {config.n_layer}{depth}, n_embd {config.n_embd}, n_head {config.n_head}, "
            f"n_inner {config.n_inner}, vocab {config.vocab_size}; sparsity {args.sparsity:.0%}; "
            f"prompt {args.prompt_tokens} + {args.new_tokens} new tokens",
            "",
            f"torch_sparse kernels: {args.kernels}. {args.repeats} interleaved rounds.",
            "",
            table,
            "",
            "Where a decoding step's time goes (medians over the rounds, part by part):",
            "",
            part_table,
            "",
            f"- torch_sparse vs dense end to end: **{tps['torch_sparse'] / tps['dense']:.2f}x** (target >= 2x); "
            f"vs the `x @ Wt` dense baseline: {tps['torch_sparse'] / tps['dense, x @ Wt']:.2f}x; "
            f"masked-dense vs dense: {tps['masked-dense'] / tps['dense']:.2f}x (same kernels, expected 1x)",
            f"- the block matrices alone: {dense['block matrices'] / sparse['block matrices']:.2f}x faster sparse; "
            f"everything but the dense LM head: {without_head:.2f}x",
            f"- the dense LM head is {sparse[head] / total['torch_sparse']:.0%} of a torch_sparse step and "
            f"{dense[head] / total['dense']:.0%} of a dense one",
            f"- the block matrices read {dense_gb:.2f} GB per token dense ({bandwidth['dense']:.1f} GB/s) and "
            f"{dense_gb * traffic:.2f} GB as int32 CSR ({bandwidth['torch_sparse']:.1f} GB/s); were both kernels bound "
            f"by the same memory bandwidth, end to end would be at most {ceiling:.2f}x (a higher ratio means the dense "
            "kernel leaves bandwidth unused)",
            f"- largest spread of one variant's samples (max/min - 1): {spread:.1%}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24, help="blocks of GPT-3 Medium to build (default: all 24)")
    parser.add_argument("--sparsity", type=float, default=0.75, help="fraction of zeros (default: 0.75)")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="random prompt length (default: 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per call (default: 32)")
    add_common_arguments(parser, repeats=3, seeded="weights, masks and prompt")
    args = parser.parse_args(argv)
    if not 0 < args.sparsity < 1:
        parser.error(f"--sparsity: must be in (0, 1), got {args.sparsity}")
    if min(args.layers, args.prompt_tokens, args.new_tokens, args.repeats) < 1:
        parser.error("--layers, --prompt-tokens, --new-tokens and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = begin(args.threads)
    config = med_config(args.layers)
    models, args.kernels = build_models(config, args.sparsity, args.seed)
    print(f"built {config.name}; torch_sparse: {args.kernels}", flush=True)
    prompt = torch.randint(config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(args.seed))
    timings, parts, tokens = measure(models, prompt.tolist(), args.new_tokens, args.repeats)
    text = report(config, timings, parts, args)
    same = tokens["masked-dense"] == tokens["torch_sparse"]
    text += f"\n- masked-dense and torch_sparse decode the same tokens: {'yes' if same else 'no'}"
    text = f"{METHOD.strip()}\n\n{text}"
    print(text)
    publish(SECTION, text, env, args.write)


if __name__ == "__main__":
    main()

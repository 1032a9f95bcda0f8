"""The GPU check in one command: the `cuda` tests, then training steps and 2:4 inference timed, into docs/benchmarks.md.

On a GPU (`med`, then `llama3_1b`: estimated 9 minutes on an H100 / H200, each model's section written as soon as it is
done; `--model med` alone under 7; the run prints its own estimate before it starts):
    python bench/gpu.py --write
On 2 or more GPUs, FSDP2 training runs under torchrun (bench/fsdp.py; on one GPU it writes why nothing ran):
    python bench/gpu.py --fsdp --write
On CPU (CI, or a developer without a GPU: checks that the script works; compiled vs eager on CPU):
    python bench/gpu.py --device cpu --model tiny,med2 --write
On a GPU machine without access to a package registry (it has torch, transformers, ... but not hydra-core,
omegaconf, antlr4-python3-runtime, datasets, dill, multiprocess): here, `bash scripts/gpu_wheels.sh download`
(writes .wheels/, git-ignored), carry .wheels/ to the machine, and there run
    bash scripts/gpu_wheels.sh install && python bench/gpu.py --write
What is measured is in `METHOD` (and `fsdp.METHOD`), which also heads the sections this writes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import fsdp
import torch
import torch._dynamo
from common import (
    REPO,
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

from modelzoo.backends.masked_dense import MaskedDenseBackend
from modelzoo.backends.torch_sparse import TorchSparseConverter, kernel_summary
from modelzoo.config.train import OptimConfig, TrainConfig
from modelzoo.export.hf import hf_model_class, to_hf_config
from modelzoo.flops import flop_report
from modelzoo.memory import DDP_BUCKETS, GIB, memory_plan
from modelzoo.models.gpt import GPT
from modelzoo.models.registry import build_model
from modelzoo.optim import build_optimizer
from modelzoo.sparsity.config import NMPattern, SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity
from modelzoo.train.accel import fuses_adamw, prepare_model, setup_device
from modelzoo.train.mfu import format_fraction, mfu, peak_flops

METHOD = """\
A training step is `zero_grad`, forward with loss under the precision's autocast, backward, gradient-norm clipping
at 1.0 and an AdamW step, as the trainer runs it: the trainer's `build_optimizer` (fused on CUDA), TF32 from
`modelzoo.train.accel.setup_device`, the masked_dense backend's autocast, and for `compiled` the trainer's
`prepare_model` (in-place `nn.Module.compile` after the sparsity hooks). Variants, from the same seed, on one
random batch:
- HF: `transformers.GPT2LMHeadModel` (GPT shapes) or `LlamaForCausalLM` (Llama shapes) of the same shape
  (`to_hf_config`, SDPA attention, its unpadded vocabulary), loss as HF computes it (`labels=x`);
- ours, dense; ours, masked-dense static 75% (Cerebras' default parameter selection: GPT's four block matrices,
  Llama's seven); GPT shapes also: ours, RigL 75% on a step without mask update, a RigL mask-update step
  (dense-gradient capture, regrowth) timed eagerly, and the RigL step time amortised at update.freq 100. Llama shapes
  leave RigL and compiled HF out to keep the GPU check short (ours vs HF is then eager only).
On a GPU each variant is built, warmed up (compiling, for `compiled`) and timed alone, then freed, so that the GPU
holds one model at a time; on CPU all variants are built first and timed in interleaved rounds (A B C A B C ...).
Either way: `repeats` rounds of `steps` steps, the device synchronised at the end of each; the sample is the round's
mean step and tokens/s comes from the median sample. MFU is the model's dense training FLOPs per token
(`modelzoo.flops`, our padded vocabulary for ours, HF's for HF) times tokens/s over the device's dense peak
(`modelzoo.train.mfu`); peak memory is `torch.cuda.max_memory_allocated` of the variant, beside what
`modelzoo.memory` plans for ours eager in one process (the DDP plan without its gradient buckets). The 2:4 row times a
no-grad forward of the same model with 2:4 masks on every block matrix, masked-dense vs the torch_sparse converter's
`semi_structured` kernels (CUDA only), interleaved.
"""
SECTION_GPU = "GPU {device}, {model}: training step, masked-dense, compile, 2:4 inference (bench/gpu.py)"
SECTION_CPU = "torch.compile on CPU: compiled vs eager training step (bench/gpu.py --device cpu)"
OPTIM = OptimConfig()
UPDATE_FREQ = 100
SPARSITY = {
    "dense": None,
    "static75": SparsityConfig(sparsity=0.75),
    "rigl75": SparsityConfig(sparsity=0.75, algorithm="rigl", update={"steps": [0]}),  # no update in the timing
    "rigl75_update": SparsityConfig(sparsity=0.75, algorithm="rigl", update={"freq": 1}),  # every step updates
}
LABELS = {
    "hf": "HF {hf} (sdpa), dense",
    "dense": "ours, dense",
    "static75": "ours, masked-dense static 75%",
    "rigl75": "ours, RigL 75%, step without mask update",
    "rigl75_update": "ours, RigL 75%, mask-update step",
}


SHAPES = {
    "med": Shape(model_size("med"), batch=8, seq=2048, steps=10),
    "med2": Shape(model_size("med", name="med2", n_layer=2), batch=4, seq=256, steps=2),
    "tiny": Shape(model_size("tiny"), batch=8, seq=128, steps=5),
    "llama3_1b": Shape(model_size("llama3_1b"), batch=4, seq=2048, steps=5),
    "llama_tiny": Shape(model_size("llama_tiny"), batch=8, seq=128, steps=5),
}
GPU_MODELS = "med,llama3_1b"  # --model on CUDA when not given
CPU_MODELS = "tiny"
# Rough rates for the estimate printed before a run: achieved fraction of a known GPU peak, CPU FLOP/s, and
# seconds of compiling one variant (the first; the others hit inductor's graph cache for the most part).
GPU_ACHIEVED = 0.35
CPU_FLOPS = 5e10
COMPILE_S = {"cuda": 60.0, "cpu": 60.0}
CUDA_TESTS_S = 90.0


@dataclass
class Result:
    timing: Timing
    flops_per_token: float
    peak_memory_gib: float | None
    planned_gib: float | None = None  # modelzoo.memory's plan for ours eager in one process


def batch(shape: Shape, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(shape.model.vocab_size, (shape.batch, shape.seq + 1), generator=generator)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)  # (B, T) each


def build_step(
    variant: str, shape: Shape, device: torch.device, precision: str, compiled: bool, seed: int
) -> tuple[Callable[[], None], float]:
    """A training-step function of `variant`, and the dense training FLOPs per token of the network it runs."""
    x, y = batch(shape, device, seed)
    setup_device(device)
    autocast = MaskedDenseBackend().autocast(device, precision)
    torch.manual_seed(seed)
    if variant == "hf":
        with device:
            model = hf_model_class(shape.model)(to_hf_config(shape.model)).train()
        model.set_attn_implementation("sdpa")
        if compiled:
            model.compile()
        optimizer = build_optimizer(model, OPTIM, fused=fuses_adamw(OPTIM, device.type))

        def loss() -> torch.Tensor:
            return model(input_ids=x, labels=x, use_cache=False).loss

        flops = flop_report(dataclasses.replace(shape.model, padded_vocab_multiple=1), shape.seq).dense_per_token
    else:
        with device:
            model = build_model(shape.model).train()
        sparsity = SPARSITY[variant]
        plugin = MaskedSparsity(sparsity, seed) if sparsity else None
        if plugin:
            plugin.apply(model)
        prepare_model(model, TrainConfig(compile=compiled), device.type)
        optimizer = build_optimizer(model, OPTIM, fused=fuses_adamw(OPTIM, device.type))
        if plugin:
            plugin.apply_optimizer(optimizer)

        def loss() -> torch.Tensor:
            return model(x, y)[1]

        flops = flop_report(shape.model, shape.seq).dense_per_token

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        optimizer.step()

    return step, flops


def synchronized(fn: Callable[[], None], device: torch.device, number: int) -> Callable[[], None]:
    """`number` calls of `fn` as one unit, the device synchronised at its end (CUDA runs asynchronously)."""

    def run() -> None:
        for _ in range(number):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def measure_variant(
    variant: str, shape: Shape, device: torch.device, precision: str, compiled: bool, args: argparse.Namespace
) -> Result:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, flops = build_step(variant, shape, device, precision, compiled, args.seed)
    steps = args.steps or shape.steps
    timings = time_interleaved(
        {variant: synchronized(step, device, steps)}, warmup=args.warmup, repeats=args.repeats, number=1
    )
    timing = Timing(tuple(s / steps for s in timings[variant].samples))
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if compiled:
        torch._dynamo.reset()  # drop the compiled code that holds this variant's model
    planned = None if variant == "hf" or compiled or memory is None else planned_gib(variant, shape, precision)
    return Result(timing, flops, memory, planned)


def planned_gib(variant: str, shape: Shape, precision: str) -> float:
    """GiB `modelzoo.memory` plans for one process training `variant` of ours eagerly (no DDP buckets: no torchrun)."""
    plan = memory_plan(shape.model, SPARSITY[variant], precision, shape.batch, shape.seq)
    return (plan.total - dict(plan.items)[DDP_BUCKETS]) / GIB


def measure_interleaved(shape: Shape, device: torch.device, precision: str, args: argparse.Namespace) -> dict:
    """Every variant built at once and timed in interleaved rounds (CPU: memory is no concern, and a shared machine's
    drift then hits every variant alike). Compiled variants compile during their warm-up steps."""
    steps = args.steps or shape.steps
    built = {(v, c): build_step(v, shape, device, precision, c, args.seed) for v, c in variants(shape.model.family)}
    fns = {key: synchronized(step, device, steps) for key, (step, _) in built.items()}
    timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats, number=1)
    return {key: Result(Timing(tuple(s / steps for s in timings[key].samples)), built[key][1], None) for key in built}


def time_2_4_inference(shape: Shape, device: torch.device, args: argparse.Namespace) -> str:
    """Markdown lines: a no-grad forward with 2:4 masks, masked-dense vs semi-structured kernels (CUDA only)."""
    if device.type != "cuda":
        return "- 2:4 semi-structured inference: n/a on CPU (torch's semi-structured kernels are CUDA-only)"
    torch.manual_seed(args.seed)
    with device:
        model = build_model(shape.model)
    MaskedSparsity(SparsityConfig(pattern=NMPattern(2, 4)), args.seed).apply(model)
    dense = model.to(torch.bfloat16).eval()
    converter = TorchSparseConverter(("semi_structured",))
    sparse = converter.convert(copy.deepcopy(dense), tokens=shape.tokens)
    x, _ = batch(shape, device, args.seed)

    def forward(m: GPT) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            m(x)

        return synchronized(run, device, args.steps or shape.steps)

    timings = time_interleaved(
        {"dense": forward(dense), "2:4": forward(sparse)}, warmup=args.warmup, repeats=args.repeats
    )
    a, b = timings["dense"].median, timings["2:4"].median
    return (
        f"- 2:4 semi-structured inference, bf16 no-grad forward of {shape.batch} x {shape.seq} tokens: masked-dense "
        f"{a * 1e3:.1f} ms, semi-structured {b * 1e3:.1f} ms per {args.steps or shape.steps} forwards, "
        f"**{a / b:.2f}x** ({kernel_summary(converter.choices)})"
    )


def run_cuda_tests() -> tuple[bool, str]:
    """`pytest -m cuda`: (passed, pytest's summary line)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode == 0, lines[-1] if lines else f"pytest exited {done.returncode}"


def variants(family: str) -> list[tuple[str, bool]]:
    """(variant, compiled) in the order they run; the mask-update step only eagerly; RigL and HF compiled on GPT
    shapes only."""
    if family != "gpt":  # HF compiled left out too: one compile less
        return [(v, False) for v in ("hf", "dense", "static75")] + [(v, True) for v in ("dense", "static75")]
    names = ("hf", "dense", "static75", "rigl75")
    return [(v, False) for v in (*names, "rigl75_update")] + [(v, True) for v in names]


def label(variant: str, shape: Shape) -> str:
    """A variant's row label; HF's names the transformers class of the shape's family."""
    return LABELS[variant].format(hf=hf_model_class(shape.model).__name__)


def estimate_seconds(shapes: list[Shape], device: torch.device, precision: str, args: argparse.Namespace) -> float:
    """What the run should take, from FLOPs at a typical achieved rate plus compile time per compiled variant."""
    peak = peak_flops(device, precision) if device.type == "cuda" else None
    rate = GPU_ACHIEVED * peak if peak else (1e14 * GPU_ACHIEVED if device.type == "cuda" else CPU_FLOPS)
    total = CUDA_TESTS_S if device.type == "cuda" else 0.0
    for shape in shapes:
        step_s = flop_report(shape.model, shape.seq).dense_per_token * shape.tokens / rate
        steps = args.warmup + args.repeats * (args.steps or shape.steps)
        for _, compiled in variants(shape.model.family):
            total += steps * step_s + (COMPILE_S[device.type] if compiled else 0.0)
        total += 2 * steps * step_s / 3 if device.type == "cuda" else 0.0  # the 2:4 forwards
    return total


def report(name: str, shape: Shape, results: dict[tuple[str, bool], Result], peak: float | None, steps: int) -> str:
    m = shape.model
    tps = {key: shape.tokens / r.timing.median for key, r in results.items()}
    mfus = {key: mfu(r.flops_per_token, tps[key], peak) for key, r in results.items()}
    rows = []
    for (variant, compiled), r in results.items():
        dense = tps.get(("dense", compiled))
        rows.append(
            [
                label(variant, shape),
                "compiled" if compiled else "eager",
                f"{r.timing.median * 1e3:.1f}",
                f"{tps[variant, compiled]:,.0f}",
                format_fraction(mfus[variant, compiled]),
                "n/a" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f}",
                "" if r.planned_gib is None else f"{r.planned_gib:.1f}",
                f"{tps[variant, compiled] / dense:.3f}" if dense else "",
            ]
        )
    header = ["variant", "mode", "ms/step (median)", "tokens/s", "MFU", "peak memory GiB", "plan GiB"]
    table = markdown_table([*header, "tokens/s vs ours dense"], rows)
    lines = [
        f"### {name}: n_layer {m.n_layer}, n_embd {m.n_embd}, n_head {m.n_head}, vocab {m.vocab_size} (ours padded to "
        f"{m.padded_vocab_size}); micro-batch {shape.batch} x seq {shape.seq} = {shape.tokens} tokens/step",
        "",
        f"{len(next(iter(results.values())).timing.samples)} rounds of {steps} step(s) per variant.",
        "",
        table,
        "",
    ]
    for mode, compiled in (("eager", False), ("compiled", True)):
        if ("dense", compiled) not in results:
            continue
        dense = results["dense", compiled].timing.median
        static = results["static75", compiled].timing.median / dense - 1
        rigl = ""
        if ("rigl75", compiled) in results:
            update = results["rigl75_update", False].timing.median - results["rigl75", False].timing.median
            amortised = (results["rigl75", compiled].timing.median + update / UPDATE_FREQ) / dense - 1
            rigl = (
                f"; RigL 75% at update.freq {UPDATE_FREQ} (the eager mask-update step's extra time amortised) "
                f"**{amortised:+.1%}**"
            )
        hf = ""
        if ("hf", compiled) in results:
            hf = f"; ours dense / HF tokens/s **{tps['dense', compiled] / tps['hf', compiled]:.2f}x** (target >= 1.2x)"
        lines.append(
            f"- {mode}: masked-dense static 75% step time vs dense **{static:+.1%}** (target within 3%){rigl}{hf}"
        )
    if ("dense", True) in results:
        lines.append(
            f"- compiled / eager tokens/s, ours dense: **{tps['dense', True] / tps['dense', False]:.2f}x** (target "
            f">= 1.3x on a GPU); MFU of ours dense compiled: **{format_fraction(mfus['dense', True])}** (target >= "
            "40% for `med` bf16 on a GPU)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default: cuda")
    parser.add_argument(
        "--model",
        default=None,
        help=f"comma-separated, out of {sorted(SHAPES)} (cuda: {GPU_MODELS}, cpu: {CPU_MODELS}); with --fsdp: one",
    )
    parser.add_argument("--precision", default=None, choices=("bf16", "fp32"), help="default: bf16 (cuda), fp32 (cpu)")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: per model, 10 for med)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default: 2)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the cuda-marked tests first")
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help=f"instead: `modelzoo pretrain task.parallelism=fsdp` under torchrun on every GPU (2 gloo ranks on CPU), "
        f"dense and static 75% (default model: {fsdp.GPU_MODEL} on cuda, {fsdp.CPU_MODEL} on cpu); see bench/fsdp.py",
    )
    add_common_arguments(parser, repeats=3, seeded="weights, masks and the batch")
    args = parser.parse_args(argv)
    default = (fsdp.GPU_MODEL if args.device == "cuda" else fsdp.CPU_MODEL) if args.fsdp else None
    default = default or (GPU_MODELS if args.device == "cuda" else CPU_MODELS)
    args.model = split_choices(parser, "--model", args.model or default, SHAPES)
    if args.fsdp and len(args.model) != 1:
        parser.error(f"--fsdp times one model; got --model {','.join(args.model)}")
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu --model tiny")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = begin(args.threads)
    if device.type == "cuda":
        env.update(device=torch.cuda.get_device_name(device), cuda=str(torch.version.cuda))
    env["precision"] = args.precision
    shapes = [SHAPES[name] for name in args.model]
    if args.fsdp:
        return fsdp.main(args, shapes[0], env)
    print(
        f"this run should take about {estimate_seconds(shapes, device, args.precision, args) / 60:.1f} min", flush=True
    )
    start = time.perf_counter()
    head, passed = [METHOD.strip()], True
    if device.type == "cuda" and not args.skip_tests:
        passed, summary = run_cuda_tests()
        head.append(f"`pytest -m cuda`: {summary}")
    peak = peak_flops(device, args.precision)
    parts = []
    for name, shape in zip(args.model, shapes, strict=True):
        if device.type == "cpu":
            results = measure_interleaved(shape, device, args.precision, args)
        else:  # one model at a time on the GPU
            results = {
                (variant, compiled): measure_variant(variant, shape, device, args.precision, compiled, args)
                for variant, compiled in variants(shape.model.family)
            }
        for (variant, compiled), result in results.items():
            mode = "compiled" if compiled else "eager"
            print(f"{name} {label(variant, shape)}, {mode}: {result.timing.median * 1e3:.1f} ms/step", flush=True)
        model_parts = [
            report(name, shape, results, peak, args.steps or shape.steps),
            time_2_4_inference(shape, device, args),
        ]
        print(*model_parts, "", sep="\n", flush=True)
        if device.type == "cuda":  # each model's section as soon as it is measured: a run cut short keeps those done
            done = {**env, "wall time": f"{time.perf_counter() - start:.0f} s"}
            publish(
                SECTION_GPU.format(device=env["device"], model=name), "\n\n".join(head + model_parts), done, args.write
            )
        parts += model_parts
    if device.type == "cpu":
        env["wall time"] = f"{time.perf_counter() - start:.0f} s"
        publish(SECTION_CPU, "\n\n".join(head + parts), env, args.write)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

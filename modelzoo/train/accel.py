"""How a training step runs fast on its device: TF32, fused AdamW, activation checkpointing, torch.compile.

Each is applied from outside to the built model or optimizer (torchtitan's converters), so `modelzoo.models.gpt`
stays plain PyTorch. `prepare_model` runs after the sparsity plug-in has put its mask buffers and gradient hooks on
the model: blocks are then checkpointed, and the model is compiled in place (`nn.Module.compile`), so parameter and
state-dict names stay the eager model's and checkpoints, exports, DDP and the sparsity hooks see the same module.
The gradient hooks sit on the parameters (leaves of the compiled graph) and the optimizer hooks outside it, so both
run eagerly around the compiled forward and backward; mask updates change buffer values, never shapes, and trigger
no recompilation.

`auto` (null) defaults, and why:
- `task.compile`: on for CUDA, off for CPU. On a GPU the step of our GPT-2 block is GEMMs (cuBLAS either way) plus
  memory-bound element-wise work (LayerNorm, GELU, residual adds, bf16 casts, the logits' fp32 cast) that inductor
  fuses into a few Triton kernels, the gain nanoGPT and torchtitan compile for; the one-off compile (about a minute
  for `med`) is small against a GPU run. On CPU the compile takes longer than a short run saves
  (docs/benchmarks.md, "torch.compile on CPU"), so it is opt-in there.
- `optim.fused`: on for CUDA (one kernel for the whole AdamW update instead of a few per parameter group); torch's
  default (foreach) elsewhere, so CPU runs keep their numbers.
- TF32 for fp32 matmuls on CUDA (`torch.set_float32_matmul_precision("high")`): fp32 runs use the tensor cores, with
  fp32 accumulation; bf16 runs autocast as before (the backend's `autocast`).
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from modelzoo.config.train import OptimConfig, TrainConfig
from modelzoo.errors import ConfigError
from modelzoo.models.registry import CausalLM


def setup_device(device: torch.device) -> None:
    """Set the process-wide matmul precision for `device`: TF32 on CUDA (autocast is the backend's)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def compiles(task: TrainConfig, device_type: str, own_compiler: bool = False) -> bool:
    """Whether the model is compiled: `task.compile`, or for null (auto) whether the device is CUDA and the backend
    does not compile the step itself (`Capabilities.own_compiler`)."""
    if task.compile is None:
        return device_type == "cuda" and not own_compiler
    return task.compile


def fuses_adamw(optim: OptimConfig, device_type: str, own_compiler: bool = False) -> bool:
    """Whether AdamW runs fused: `optim.fused`, or for null (auto) whether the device is CUDA and the optimizer
    torch's (not a backend's own, `Capabilities.own_compiler`)."""
    if optim.fused is None:
        return device_type == "cuda" and not own_compiler
    return optim.fused


def compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot compile the model for `device_type` here, or None if it can."""
    import torch._dynamo  # imported on demand: it takes a second, and only compiled runs need it

    if not torch._dynamo.is_dynamo_supported():
        return f"torch {torch.__version__} cannot compile on Python {platform.python_version()}"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor generates Triton kernels for CUDA and triton is not installed"
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)]
    return None if compilers else "inductor's CPU code needs a C++ compiler (g++ or clang++, or $CXX) on PATH"


def fused_problem(device_type: str) -> str | None:
    """Why torch's fused AdamW cannot run on `device_type`, or None if it can."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = _get_fused_kernels_supported_devices()
    if device_type in supported:
        return None
    return f"torch {torch.__version__} has fused AdamW kernels for {', '.join(supported)}, not {device_type}"


def validate_accel(task: TrainConfig, optim: OptimConfig, device_type: str, own_compiler: bool) -> None:
    """Config-time checks of `task.compile`, `optim.fused` and `task.peak_tflops`, naming the key and what works;
    `own_compiler`: the backend compiles the step itself (`Capabilities.own_compiler`)."""
    if task.peak_tflops is not None and task.peak_tflops <= 0:
        raise ConfigError("task.peak_tflops", f"must be positive (the device's dense peak), got {task.peak_tflops}")
    own = own_compiler
    if task.compile and own:
        raise ConfigError("task.compile", "the backend compiles the step itself; set task.compile=false")
    if compiles(task, device_type, own) and not own:
        problem = compile_problem(device_type)
        if problem:
            raise ConfigError("task.compile", f"{problem}; set task.compile=false to train eagerly")
    if optim.fused and own:
        raise ConfigError("optim.fused", "the backend brings its own AdamW; set optim.fused=false")
    if optim.fused:
        problem = fused_problem(device_type)
        if problem:
            raise ConfigError("optim.fused", f"{problem}; set optim.fused=false (or null: fused where supported)")
    if task.activation_checkpointing and own:
        raise ConfigError("task.activation_checkpointing", "the backend plans memory itself; set it false")


def checkpoint_blocks(model: CausalLM) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (per-block activation
    checkpointing, torchtitan's `full` mode). Non-reentrant `torch.utils.checkpoint`: the RNG state is replayed (the
    same dropout masks), parameter gradient hooks fire as without it, and torch.compile traces through it. Module and
    parameter names do not change."""
    for block in model.blocks:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*args: object) -> torch.Tensor:
        return checkpoint(forward, *args, use_reentrant=False)

    return run


def prepare_model(
    model: CausalLM, task: TrainConfig, device_type: str, own_compiler: bool = False, sharded: bool = False
) -> None:
    """Activation checkpointing and torch.compile as `task` asks, after the sparsity plug-in's hooks are on.
    `sharded` (FSDP2 will shard each block): each block is compiled on its own, as torchtitan does, so that FSDP's
    gathers and reduce-scatters run between the compiled blocks, not inside one graph of the whole model."""
    if task.activation_checkpointing:
        checkpoint_blocks(model)
    if compiles(task, device_type, own_compiler):
        for module in model.blocks if sharded else [model]:
            module.compile()

"""Model FLOPs utilisation and peak device memory, for every training log line and the run summary.

MFU (Chowdhery et al. 2022, PaLM, appendix B; nanoGPT's `estimate_mfu`) is the model's analytic training FLOPs per
token (`modelzoo.flops`, dense: masked-dense emulation runs every zero, and activation recomputation is not model
work) times the tokens per second, over the device's dense peak. The peak comes from `task.peak_tflops`, else from
`PEAK_TFLOPS` by the CUDA device's name; on CPU, or a GPU not in the table, MFU is n/a.
"""

from __future__ import annotations

import re

import torch

# (pattern on torch.cuda.get_device_name, dense bf16 TFLOP/s, dense TF32 TFLOP/s): NVIDIA's datasheet figures
# without 2:4 sparsity. fp32 runs use TF32 matmuls on CUDA (modelzoo.train.accel), so TF32 is their peak.
# The first match wins: the PCIe and NVL parts come before the SXM part of the same name.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    (r"\bB200\b", 2250.0, 1100.0),
    (r"\bH200 NVL\b", 835.0, 417.5),
    (r"\bH200\b", 989.4, 494.7),
    (r"\bH100 NVL\b", 835.0, 417.5),
    (r"\bH100 PCIe\b", 756.0, 378.0),
    (r"\bH100\b", 989.4, 494.7),
    (r"\bA100\b", 312.0, 156.0),
    (r"\bL40S\b", 362.0, 183.0),
    (r"\bL4\b", 121.0, 60.0),
    (r"\bA10\b", 125.0, 62.5),
)


def table_peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of a GPU called `device_name` at `precision` (bf16; fp32 as TF32), or None if unknown."""
    for pattern, bf16, tf32 in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return bf16 if precision == "bf16" else tf32
    return None


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """FLOP/s that MFU is measured against: `override_tflops` if given, else the table's for a CUDA device."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = table_peak_tflops(torch.cuda.get_device_name(device), precision)
    return None if tflops is None else tflops * 1e12


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation (a fraction), or None without a peak."""
    return None if peak is None else flops_per_token * tokens_per_s / peak


def take_peak_memory(device: torch.device) -> float | None:
    """GiB of CUDA memory allocated at the peak since the last call (the steps of one log window), then reset; None
    off CUDA."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def format_fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def format_gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"

"""Refusing weights that hold NaN or Inf: a diverged model is never saved, exported, resumed or served.

A model whose training diverged still loads, runs and exports without complaint, and what it produces (one
token, the same answer to every question) looks like a result. Every place that reads or writes weights a
user will use checks them here first and names the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from modelzoo.errors import CheckpointError


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors in `named` that hold a NaN or an Inf, in order (one device sync)."""
    floats = [(name, t) for name, t in named if torch.is_tensor(t) and t.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).tolist()
    return [name for (name, _), ok in zip(floats, finite, strict=True) if not ok]


def refuse_nonfinite(named: Iterable[tuple[str, torch.Tensor]], source: object, advice: str) -> None:
    """Raise `CheckpointError` naming the first tensor of `named` holding NaN/Inf (from `source`), with `advice`."""
    bad = nonfinite_tensors(named)
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source}: {bad[0]}{more} holds NaN or Inf values, so the training diverged; {advice}")

"""`task.precision` on cstorch: its automatic mixed precision, set before the model is built, never torch's autocast.

As the Cerebras Model Zoo does it: `cstorch.amp.set_half_dtype` picks the 16-bit type (bf16 -> bfloat16, cbf16 ->
Cerebras' cbfloat16, fp16 -> float16); on a CS-2 the compiler casts the program itself (no autocast context), on
cstorch's CPU / GPU backends `cstorch.amp.autocast()` does. cbfloat16 and float16 need dynamic loss scaling
(`cstorch.amp.GradScaler("dynamic")`), which exists on a CS-2 only; cstorch's CPU backend runs bfloat16 only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from modelzoo.backends.cerebras.environment import import_cstorch

HALF_DTYPES = {"bf16": "bfloat16", "cbf16": "cbfloat16", "fp16": "float16"}
SCALED = frozenset({"cbf16", "fp16"})  # loss scaling required; a CS-2 (cluster=cs2) only


def set_precision(precision: str) -> None:
    """Before the model is built: cstorch's mixed precision with `precision`'s 16-bit type (nothing for fp32)."""
    if precision == "fp32":
        return
    amp = import_cstorch().amp
    amp.set_half_dtype(HALF_DTYPES[precision])


class _CstorchAutocast(AbstractContextManager):
    """`cstorch.amp.autocast()` as a context the loop can enter at every micro-batch (cstorch's is single-use)."""

    def __enter__(self) -> None:
        self._context = import_cstorch().amp.autocast()
        self._context.__enter__()

    def __exit__(self, *exc: object) -> bool | None:
        return self._context.__exit__(*exc)


def autocast(precision: str) -> AbstractContextManager:
    """The context of a forward pass: none on a CS-2 or in fp32, `cstorch.amp.autocast()` on CPU / GPU."""
    if precision == "fp32" or import_cstorch().use_cs():
        return nullcontext()
    return _CstorchAutocast()


def grad_scaler(precision: str) -> Any:
    """A dynamic `cstorch.amp.GradScaler` for cbf16 / fp16, None otherwise."""
    return import_cstorch().amp.GradScaler(loss_scale="dynamic") if precision in SCALED else None

"""Inference converters: rewrite a loaded model for forward-only use (`generate`, `evaluate`), torchtitan's
`ModelConverter` shape. Chosen with `task.converter` (training backends are `backend=`, a different concept).

`none` leaves the model as it is (its pruned weights are already exact zeros); `torch_sparse` swaps masked linears
for `torch.sparse` kernels. A converter is imported only when it is used.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from torch import nn

from modelzoo.errors import ConfigError

# name -> "module:class", imported on first use.
CONVERTERS: dict[str, str] = {"torch_sparse": "modelzoo.backends.torch_sparse:TorchSparseConverter"}
UNCONVERTED = ("none",)  # the model runs as loaded


class Converter(Protocol):
    name: str
    devices: frozenset[str]
    dtypes: frozenset[str]

    def convert(self, model: nn.Module, tokens: int) -> nn.Module:
        """`model` rewritten (in place) for forward calls of about `tokens` tokens each."""
        ...


def converter(name: str) -> Converter | None:
    """The converter `task.converter=name` selects; None when the model runs as loaded."""
    if name in UNCONVERTED:
        return None
    if name not in CONVERTERS:
        raise ConfigError("task.converter", f"unknown inference converter {name!r}", OPTIONS)
    module, _, attr = CONVERTERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)()


def check_converter(name: str, device: str, dtype: str) -> None:
    """Fail at config time if converter `name` cannot run on `device` in `dtype`."""
    chosen = converter(name)
    if chosen is None:
        return
    if device not in chosen.devices:
        raise ConfigError("task.converter", f"{name!r} does not support device {device!r}", UNCONVERTED)
    if dtype not in chosen.dtypes:
        raise ConfigError("task.converter", f"{name!r} does not support dtype {dtype!r}", UNCONVERTED)


def convert(model: nn.Module, name: str, tokens: int) -> nn.Module:
    """`model` as converter `name` runs it for inference of about `tokens` tokens per call."""
    chosen = converter(name)
    return model if chosen is None else chosen.convert(model, tokens)


OPTIONS = (*UNCONVERTED, *CONVERTERS)

"""Training backends: `backend=<name>` picks one; `auto` takes the first available in `AUTO_ORDER`.

A backend is imported only when it is used (`backend_class`). Inference converters (`torch_sparse`), which rewrite
a loaded model for `generate` / `evaluate`, are another concept with their own key (`task.converter`) and registry
(`modelzoo.backends.converters`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from modelzoo.backends.base import Backend, Capabilities, Sparsifier
from modelzoo.errors import ConfigError

# name -> "module:class", imported on first use.
BACKENDS: dict[str, str] = {
    "cerebras": "modelzoo.backends.cerebras:CerebrasBackend",
    "masked_dense": "modelzoo.backends.masked_dense:MaskedDenseBackend",
}
# Preference order for backend=auto.
AUTO_ORDER = ("cerebras", "masked_dense")


def backend_class(name: str) -> type[Backend]:
    """The class of backend `name` (a registered name, not `auto`)."""
    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve_name(name: str) -> str:
    """The concrete backend name for `name` (`auto`: the first available in `AUTO_ORDER`)."""
    if name == "auto":
        return next(n for n in AUTO_ORDER if backend_class(n).is_available())
    if name not in BACKENDS:
        from_converters = "it is an inference converter (generate and evaluate take task.converter=torch_sparse); "
        raise ConfigError(
            "backend.name",
            f"backend {name!r} does not support training: {from_converters if name == 'torch_sparse' else ''}"
            "train with one of",
            ["auto", *BACKENDS],
        )
    return name


def backends_with(supported: Callable[[Capabilities], bool]) -> list[str]:
    """The registered training backends whose capabilities satisfy `supported` (what an error offers instead)."""
    return [name for name in BACKENDS if supported(backend_class(name).capabilities)]


def check_supports(name: str, *, algorithm: str | None, device: str, dtype: str) -> None:
    """Fail at config time if training backend `name` lacks a capability, naming the backends that have it."""
    requirements: list[tuple[str, Callable[[Capabilities], bool]]] = [
        (f"sparsity algorithm {algorithm!r}", lambda c: algorithm is None or algorithm in c.algorithms),
        (f"device {device!r}", lambda c: device in c.devices),
        (f"dtype {dtype!r}", lambda c: dtype in c.dtypes),
    ]
    for what, supported in requirements:
        if not supported(backend_class(name).capabilities):
            able = backends_with(supported)
            raise ConfigError("backend.name", f"backend {name!r} does not support {what}", able or ["no backend"])
    reason = backend_class(name).unavailable_reason()
    if reason:
        raise ConfigError("backend.name", reason)


def get_backend(name: str) -> Backend:
    return backend_class(resolve_name(name))()


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Backend",
    "Capabilities",
    "Sparsifier",
    "backend_class",
    "backends_with",
    "check_supports",
    "get_backend",
    "resolve_name",
]

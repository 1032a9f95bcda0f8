"""Backend registry: `backend=<name>` picks one; `auto` takes the first available in `AUTO_ORDER`."""

from __future__ import annotations

from collections.abc import Callable

from modelzoo.backends.base import Backend, Capabilities, Sparsifier
from modelzoo.backends.cerebras import CerebrasBackend
from modelzoo.backends.masked_dense import MaskedDenseBackend
from modelzoo.backends.torch_sparse import TorchSparseBackend
from modelzoo.errors import ConfigError

BACKENDS: dict[str, type[Backend]] = {}
# Preference order for backend=auto; a name is skipped while no backend of that name is registered.
AUTO_ORDER = ("cerebras", "masked_dense")


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


register(CerebrasBackend)
register(MaskedDenseBackend)
register(TorchSparseBackend)


def resolve_name(name: str, *, train: bool = True) -> str:
    """The concrete backend name for `name` (`auto` picks the first available one that can train, or run
    inference when `train` is false: cerebras trains only)."""
    if name == "auto":
        return next(
            n
            for n in AUTO_ORDER
            if n in BACKENDS
            and BACKENDS[n].is_available()
            and (BACKENDS[n].capabilities.train if train else BACKENDS[n].capabilities.infer)
        )
    if name not in BACKENDS:
        raise ConfigError("backend.name", f"unknown backend {name!r}", ["auto", *BACKENDS])
    return name


def check_supports(name: str, *, algorithm: str | None, device: str, dtype: str, train: bool) -> None:
    """Fail at config time if backend `name` lacks a capability, naming the backends that have it."""
    requirements: list[tuple[str, Callable[[Capabilities], bool]]] = [
        ("training" if train else "inference", lambda c: c.train if train else c.infer),
        (f"sparsity algorithm {algorithm!r}", lambda c: algorithm is None or algorithm in c.algorithms),
        (f"device {device!r}", lambda c: device in c.devices),
        (f"dtype {dtype!r}", lambda c: dtype in c.dtypes),
    ]
    for what, supported in requirements:
        if not supported(BACKENDS[name].capabilities):
            able = [n for n, cls in BACKENDS.items() if supported(cls.capabilities)]
            raise ConfigError("backend.name", f"backend {name!r} does not support {what}", able or ["no backend"])
    reason = BACKENDS[name].unavailable_reason()
    if reason:
        raise ConfigError("backend.name", reason)


def get_backend(name: str, *, train: bool = True) -> Backend:
    return BACKENDS[resolve_name(name, train=train)]()


__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "Sparsifier",
    "check_supports",
    "get_backend",
    "register",
    "resolve_name",
]

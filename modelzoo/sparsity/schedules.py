"""Step-aware hyperparameters and mask-update schedules with the semantics of `cerebras.pytorch.sparse.utils`.

A `sparsity` or `drop_fraction` value is a number (constant), a list of numbers (cycled through, one value per
mask update) or a dict `{type: constant|linear|exp|power|cosine|cycling, ...}` holding the arguments of the
cstorch class of that name:

    constant  value                     y = value
    linear    init, slope               y = init + step * slope
    exp       init, gamma, final=1      y = final - (final - init) * exp(step * gamma)
    power     init, beta                y = init * beta ** step
    cosine    init, half_period, min=0  y = o + a * cos(step * pi / half_period), o = (init + minimum) / 2, a = init - o
    cycling   values                    values[i], i advancing by one at every mask update

`update` is `{freq, start, stop}` (steps `start + k * freq` before `stop`, which is exclusive) or `{steps: [...]}`;
absent, every step is an update step. Steps count optimizer steps taken (1 after the first `optimizer.step()`).
Values are computed in float32 from float32 parameters as cstorch computes them, so the mask sizes derived from
them match cstorch's exactly. Rates are range-checked here (finite slopes, exp `gamma <= 0`, power `beta > 0`,
positive cosine `half_period`); where a schedule leads within a run is checked against the run's length at config
time (`modelzoo.sparsity.plan.check_run`, over `Schedule.along` the run's mask updates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from modelzoo.errors import ConfigError

# cstorch's compiler annotation assumes updates run to this step when `update` has no `stop`.
DEFAULT_HORIZON = 100_000


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


class Schedule:
    """A hyperparameter as a function of the optimizer step (cstorch `HyperParameterSchedule`)."""

    def _compute(self, step: torch.Tensor) -> torch.Tensor:
        """The value at `step` (an int64 scalar tensor) as a float32 scalar tensor."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return float(self._compute(torch.tensor(step, dtype=torch.int64)))

    def advance(self, is_update_step: bool) -> None:
        """Called once per optimizer step after the value was read; only `Cycling` keeps state."""

    def along(self, steps: torch.Tensor) -> torch.Tensor:
        """The float32 values a fresh schedule gives at successive mask updates at `steps` (int64, ascending),
        in one vectorised evaluation (what planning a whole run reads; training reads one value per step)."""
        return self._compute(steps).expand(steps.shape)

    def final(self, last_step: int) -> float:
        """The value used at the last mask update, `last_step`."""
        return self(last_step)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless schedules have nothing to restore."""


class Constant(Schedule):
    def __init__(self, value: float) -> None:
        self.value = _f32(value)

    def _compute(self, step: torch.Tensor) -> torch.Tensor:
        return self.value


class Linear(Schedule):
    def __init__(self, init: float, slope: float) -> None:
        self.init, self.slope = _f32(init), _f32(slope)

    def _compute(self, step: torch.Tensor) -> torch.Tensor:
        return self.init + step * self.slope


class Exp(Schedule):
    def __init__(self, init: float, gamma: float, final: float = 1.0) -> None:
        self.final_value, self.gamma = _f32(final), _f32(gamma)
        self.scale = self.final_value - _f32(init)

    def _compute(self, step: torch.Tensor) -> torch.Tensor:
        return self.final_value - self.scale * torch.exp(step * self.gamma)


class Power(Schedule):
    def __init__(self, init: float, beta: float) -> None:
        self.init, self.beta = _f32(init), _f32(beta)

    def _compute(self, step: torch.Tensor) -> torch.Tensor:
        return self.init * torch.pow(self.beta, step)


class Cosine(Schedule):
    def __init__(self, init: float, half_period: float, minimum: float = 0.0) -> None:
        offset = (minimum + init) / 2
        self.amp, self.offset = _f32(init - offset), _f32(offset)
        self.freq = _f32(math.pi / half_period)

    def _compute(self, step: torch.Tensor) -> torch.Tensor:
        return self.amp * torch.cos(step * self.freq) + self.offset


class Cycling(Schedule):
    """Steps through `values`, one per mask update, and starts over after the last."""

    def __init__(self, values: list[float]) -> None:
        self.values = [_f32(v) for v in values]
        self.index = 0

    def _compute(self, step: torch.Tensor) -> torch.Tensor:
        return self.values[self.index]

    def advance(self, is_update_step: bool) -> None:
        if is_update_step:
            self.index = (self.index + 1) % len(self.values)

    def along(self, steps: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.values)[torch.arange(len(steps)) % len(self.values)]

    def final(self, last_step: int) -> float:
        # As cstorch's compiler annotation: assume the cycle has completed by the last update.
        return float(self.values[-1])

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["index"])


# type -> (class, required arguments, optional arguments)
SCHEDULES: dict[str, tuple[Callable[..., Schedule], tuple[str, ...], tuple[str, ...]]] = {
    "constant": (Constant, ("value",), ()),
    "linear": (Linear, ("init", "slope"), ()),
    "exp": (Exp, ("init", "gamma"), ("final",)),
    "power": (Power, ("init", "beta"), ()),
    "cosine": (Cosine, ("init", "half_period"), ("minimum",)),
    "cycling": (Cycling, ("values",), ()),
}
# Arguments that are values of the hyperparameter itself (range-checked), as opposed to rates.
VALUE_ARGS = ("value", "init", "final", "minimum")
# Rates: (argument, what is allowed, (exclusive lower bound, inclusive upper bound)); None: unbounded. A slope of
# either sign is finite here; where it leads over a run is checked against the run (`modelzoo.sparsity.plan`).
RATE_RANGES: dict[str, tuple[tuple[str, str, tuple[float | None, float | None]], ...]] = {
    "linear": (("slope", "a finite number", (None, None)),),
    "exp": (("gamma", "<= 0 (exp approaches `final` only for gamma <= 0)", (None, 0.0)),),
    "power": (("beta", "positive (init * beta ** step flips sign or vanishes for beta <= 0)", (0.0, None)),),
    "cosine": (("half_period", "a positive number of steps", (0.0, None)),),
}


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_fraction(x: object, key: str, closed: bool) -> None:
    upper = "1]" if closed else "1)"
    if not _is_number(x):
        raise ConfigError(key, f"must be a number in [0, {upper}, got {x!r}")
    if not (0.0 <= x <= 1.0 if closed else 0.0 <= x < 1.0):
        raise ConfigError(key, f"{x} is outside [0, {upper}")


def make_schedule(spec: object, key: str, *, closed: bool = False) -> Schedule:
    """Build a schedule from its config value, raising `ConfigError` naming `key` when it is invalid.

    Args:
        spec: a number, a list of numbers or a `{type: ..., ...}` dict (see the module docstring).
        key: the dotted config key, for error messages (e.g. `sparsity.groups[1].drop_fraction`).
        closed: whether 1.0 itself is an allowed value (`drop_fraction`) or not (`sparsity`).
    """
    if _is_number(spec):
        _check_fraction(spec, key, closed)
        return Constant(float(spec))
    if isinstance(spec, (list, tuple)):
        spec = {"type": "cycling", "values": list(spec)}
    if not isinstance(spec, Mapping):
        raise ConfigError(key, f"must be a number, a list of numbers or a schedule dict, got {spec!r}")
    args = dict(spec)
    kind = args.pop("type", None)
    if kind not in SCHEDULES:
        raise ConfigError(f"{key}.type", f"unknown schedule type {kind!r}", SCHEDULES)
    cls, required, optional = SCHEDULES[kind]
    missing = [a for a in required if a not in args]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}", f"a {kind} schedule needs {', '.join(required)}")
    for name, value in args.items():
        if name not in required + optional:
            raise ConfigError(f"{key}.{name}", f"not an argument of a {kind} schedule", required + optional)
        if name == "values":
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"{key}.values", f"must be a non-empty list of numbers, got {value!r}")
            for i, v in enumerate(value):
                _check_fraction(v, f"{key}.values[{i}]", closed)
        elif name in VALUE_ARGS:
            _check_fraction(value, f"{key}.{name}", closed=True)
        elif not _is_number(value):
            raise ConfigError(f"{key}.{name}", f"must be a number, got {value!r}")
    for name, rule, (lo, hi) in RATE_RANGES.get(kind, ()):
        value = args[name]
        if not (math.isfinite(value) and (lo is None or value > lo) and (hi is None or value <= hi)):
            raise ConfigError(f"{key}.{name}", f"must be {rule}, got {value!r}")
    return cls(**args)


@dataclass(frozen=True)
class FreqSchedule:
    """Update at steps `start + k * freq` (k >= 0) before `stop` (cstorch `FreqSchedule`)."""

    freq: int = 1
    start: int = 0
    stop: int | None = None

    def __call__(self, step: int) -> bool:
        return (step - self.start) % self.freq == 0 and step >= self.start and (self.stop is None or step < self.stop)

    def steps_until(self, last: int) -> torch.Tensor:
        """The update steps in [0, `last`], ascending (int64)."""
        stop = last + 1 if self.stop is None else min(self.stop, last + 1)
        return torch.arange(self.start, max(stop, self.start), self.freq, dtype=torch.int64)

    @property
    def last_step(self) -> int:
        """The last update step (the cstorch annotation horizon when there is no `stop`)."""
        stop = DEFAULT_HORIZON + 1 if self.stop is None else self.stop
        return self.start + max(0, (stop - 1 - self.start) // self.freq) * self.freq


@dataclass(frozen=True)
class ListSchedule:
    """Update exactly at the listed steps (cstorch `ListSchedule`)."""

    steps: frozenset[int]

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def steps_until(self, last: int) -> torch.Tensor:
        """The update steps in [0, `last`], ascending (int64)."""
        return torch.tensor(sorted(s for s in self.steps if s <= last), dtype=torch.int64)

    @property
    def last_step(self) -> int:
        return max(self.steps)


UPDATE_KEYS = ("freq", "start", "stop", "steps")


def make_update_schedule(spec: object, key: str) -> FreqSchedule | ListSchedule:
    """Build the mask-update schedule from `update` (None: every step), raising `ConfigError` naming `key`."""
    if spec is None:
        return FreqSchedule()
    if not isinstance(spec, Mapping):
        raise ConfigError(key, f"must be {{freq, start, stop}} or {{steps: [...]}}, got {spec!r}")
    unknown = [k for k in spec if k not in UPDATE_KEYS]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", "unknown key", UPDATE_KEYS)
    if "steps" in spec:
        if len(spec) > 1:
            raise ConfigError(key, "give either steps or freq/start/stop, not both")
        steps = spec["steps"]
        if not isinstance(steps, (list, tuple)) or not steps or not all(_is_int(s) and s >= 0 for s in steps):
            raise ConfigError(f"{key}.steps", f"must be a non-empty list of steps >= 0, got {steps!r}")
        return ListSchedule(frozenset(steps))
    freq, start, stop = spec.get("freq", 1), spec.get("start", 0), spec.get("stop")
    if not _is_int(freq) or freq < 1:
        raise ConfigError(f"{key}.freq", f"must be an integer >= 1, got {freq!r}")
    if not _is_int(start) or start < 0:
        raise ConfigError(f"{key}.start", f"must be an integer >= 0, got {start!r}")
    if stop is not None and (not _is_int(stop) or stop <= start):
        raise ConfigError(f"{key}.stop", f"must be an integer > start={start}, got {stop!r}")
    return FreqSchedule(freq, start, stop)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)

"""Errors that name what was wrong, where, and what would work instead."""

from __future__ import annotations

from collections.abc import Iterable


class ModelZooError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2."""


class ConfigError(ModelZooError, ValueError):
    """An invalid config value, raised before any compute. `key` is the dotted config key."""

    def __init__(self, key: str, message: str, allowed: Iterable[object] | None = None) -> None:
        self.key = key
        text = f"{key}: {message}"
        if allowed is not None:
            text += f" (allowed: {', '.join(str(a) for a in allowed)})"
        super().__init__(text)


class DataError(ModelZooError, ValueError):
    """Bad input data; the message names the file and, where it applies, the line."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        where = f"{path}" if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")


class CheckpointError(ModelZooError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or does not match the config."""


class TrainingDiverged(ModelZooError, RuntimeError):
    """A non-finite loss or gradient norm stopped training; the message names the step."""

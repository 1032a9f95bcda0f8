"""Errors that name what was wrong, where, and what would work instead."""

from __future__ import annotations

from collections.abc import Iterable


class ModelZooError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2."""

    def __reduce__(self) -> tuple:
        """Pickle as the message and attributes (an error raised in a worker process reaches its parent whole)."""
        return _rebuild, (type(self), str(self), self.__dict__)


def _rebuild(cls: type[ModelZooError], text: str, attributes: dict) -> ModelZooError:
    error = Exception.__new__(cls)
    Exception.__init__(error, text)
    error.__dict__.update(attributes)
    return error


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


class DiskFullError(ModelZooError, OSError):
    """Not enough free space to write `path`: found before writing, or raised as ENOSPC / EDQUOT during it."""

    def __init__(self, path: object, needed: int, free: int) -> None:
        self.path, self.needed, self.free = path, needed, free
        super().__init__(
            f"{path}: not enough disk space to write it: needs {needed:,} bytes ({needed / 1e6:,.1f} MB), "
            f"{free:,} bytes ({free / 1e6:,.1f} MB) free; free some space (or write elsewhere) and run again "
            "(nothing partial was left behind)"
        )


class TrainingDiverged(ModelZooError, RuntimeError):
    """A non-finite loss or gradient norm stopped training; the message names the step."""

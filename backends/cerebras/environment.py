"""Can cerebras.pytorch run here: the Python, torch and cstorch versions it needs, and the one place that imports it.

`import cerebras.pytorch` happens only when the Cerebras backend is used: it needs Python 3.11 and torch 2.4.0,
which live in their own venv (`bash scripts/make_cerebras_venv.sh .venv-cerebras`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from modelzoo.errors import ModelZooError

CSTORCH_VERSION = "2.10.0"
TORCH_VERSION = "2.4.0"
PYTHON_VERSION = (3, 11)
VENV_FIX = "make its venv with `bash scripts/make_cerebras_venv.sh .venv-cerebras` and run from it"


class CerebrasError(ModelZooError, RuntimeError):
    """cerebras.pytorch cannot do what was asked (missing, wrong version, or the appliance is unreachable)."""


def environment_problem(python: tuple[int, int], installed: bool, torch_version: str) -> str | None:
    """Why cerebras.pytorch cannot run with this Python, install state and torch: one sentence and the fix."""
    if python != PYTHON_VERSION:
        return (
            f"backend=cerebras needs Python 3.11 (cerebras-pytorch {CSTORCH_VERSION} ships cp311 wheels only) but "
            f"this is Python {python[0]}.{python[1]}: {VENV_FIX}"
        )
    if not installed:
        return f"backend=cerebras needs cerebras.pytorch, which is not installed: {VENV_FIX}"
    if torch_version.split("+")[0] != TORCH_VERSION:
        return (
            f"cerebras-pytorch {CSTORCH_VERSION} needs torch {TORCH_VERSION} exactly but torch {torch_version} "
            f"is installed: {VENV_FIX}"
        )
    return None


@functools.cache
def unavailable_reason() -> str | None:
    """Why cerebras.pytorch cannot be used in this process (one sentence with the fix), or None."""
    installed = importlib.util.find_spec("cerebras") is not None and importlib.util.find_spec("cerebras.pytorch")
    problem = environment_problem(sys.version_info[:2], bool(installed), torch.__version__)
    if problem:
        return problem
    try:
        import cerebras.pytorch  # noqa: F401
    except Exception as e:  # an undefined symbol, a missing dependency: anything that stops the import
        first = str(e).splitlines()[0] if str(e) else ""
        return f"cerebras.pytorch fails to import ({type(e).__name__}: {first}): {VENV_FIX}"
    return None


def import_cstorch() -> ModuleType:
    """`cerebras.pytorch`, or a `CerebrasError` saying in one sentence why not and how to fix it."""
    reason = unavailable_reason()
    if reason:
        raise CerebrasError(reason)
    import cerebras.pytorch as cstorch

    return cstorch


def put_venv_tools_on_path() -> None:
    """cstorch lowers with the `torch-cirh-opt` tool its wheel puts in the venv's bin/, which it looks up on
    PATH; a venv used without activating it (`.venv-cerebras/bin/python ...`) lacks it there."""
    if shutil.which("torch-cirh-opt") is None:
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

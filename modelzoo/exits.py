"""How a command ends on an error: one line on stderr and an exit code (2 anticipated, 1 unexpected)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from typing import NoReturn


def fail(error: Exception) -> NoReturn:
    """End the command on an anticipated error: its message as one line on stderr, exit code 2.

    Under torchrun every rank refuses a bad config alike: the line comes from rank 0 alone (another rank prints
    only an error of its own), and the ranks end together, each with exit code 2 (`says_first`)."""
    message = f"error: {error}"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        print(message, file=sys.stderr)
        sys.exit(2)
    from modelzoo.distributed import says_first  # here: `modelzoo --help` and a refused config import no torch

    if says_first(message):
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # at once: a rank still tearing down the interpreter when another has ended gets torchrun's SIGTERM


def fail_unexpected(error: Exception) -> NoReturn:
    """End the command on an unexpected error: one line naming it and the file its full traceback was appended to
    (the run's log when logging writes one, else a new temporary file), exit code 1. With `HYDRA_FULL_ERROR=1` the
    error propagates whole instead, as Hydra's own errors do."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logs = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if logs:
        path = logs[0]
        with open(path, "a") as f:
            f.write(text)
    else:
        fd, path = tempfile.mkstemp(prefix="modelzoo-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    summary = (str(error).strip().splitlines() or [""])[0]
    print(
        f"error: unexpected {type(error).__name__}: {summary} (the full traceback is in {path}; "
        "HYDRA_FULL_ERROR=1 prints it here)",
        file=sys.stderr,
    )
    sys.exit(1)

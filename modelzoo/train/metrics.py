"""Metrics to CSV and TensorBoard; a resumed run truncates rows past the step it resumes from."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

COLUMNS = ("step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s", "sparsity", "val_loss", "val_ppl")


class MetricsLogger:
    """Appends one CSV row per logged step to `<run_dir>/metrics.csv` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, columns: tuple[str, ...] = COLUMNS) -> None:
        self.columns = columns
        self.path = Path(run_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = self._rows_until(resume_step) if resume_step is not None and self.path.exists() else []
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
        self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def _rows_until(self, step: int) -> list[dict[str, str]]:
        with self.path.open(newline="") as f:
            return [row for row in csv.DictReader(f) if int(row["step"]) <= step]

    def log(self, step: int, **values: float) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"unknown metric columns {sorted(unknown)}; known: {self.columns}")
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({"step": step, **{k: repr(float(v)) for k, v in values.items()}})
        for key, value in values.items():
            if key != "tokens":
                self.tensorboard.add_scalar(key, value, step)

    def log_scalars(self, step: int, prefix: str, values: dict[str, float]) -> None:
        """TensorBoard-only scalars, e.g. per-parameter sparsity."""
        for key, value in values.items():
            self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.tensorboard.close()


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float (a diverging run's loss of 1e9 is no reason to crash)."""
    return math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf

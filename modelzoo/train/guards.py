"""Non-finite training: a NaN or Inf loss or gradient norm stops the run (or skips the update, a bounded
number of times) instead of training on, checkpointing and exporting NaNs with exit code 0.

`task.on_nonfinite=stop` (default): every step's flags stay on the device (no host sync per step); at each
log, evaluation and checkpoint step the run stops if any step since the last check was non-finite, naming
the first one, before anything is written. `skip`: the update of a non-finite step is not applied (optimizer
and LR schedule do not step; its batch is consumed), the step is named in a warning, and the run stops after
more than `task.max_nonfinite_skips` skipped steps. Deciding before the update costs one host sync per step,
and needs a step that can branch on the host (not the Cerebras backend's traced one).

Ranks agree: a step is non-finite when it is on any rank (the flag is summed over ranks), so every rank
skips or stops at the same step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from modelzoo.distributed import Distributed
from modelzoo.errors import TrainingDiverged
from modelzoo.sparsity.shards import local

log = logging.getLogger(__name__)
ADVICE = (
    "lower the learning rate (optim.lr; task.lr when fine-tuning) or raise optim.warmup_steps and resume from the "
    "last checkpoint (task.resume=true); pre-training can skip such steps instead (task.on_nonfinite=skip, at most "
    "task.max_nonfinite_skips)"
)


class NonFiniteGuard:
    """Watches the loss and gradient norm of every optimizer step (see the module docstring).

    Args:
        policy: "stop" or "skip".
        max_skips: the most steps `skip` may leave out over the whole run (resumes included).
        dist: the job's ranks, which must agree on every decision.
        skips: steps already skipped (restored on resume).
    """

    def __init__(self, policy: str, max_skips: int, dist: Distributed, skips: int = 0) -> None:
        self.policy = policy
        self.max_skips = max_skips
        self.dist = dist
        self.skips = skips
        self._first: torch.Tensor | None = None  # (step, loss, grad norm) of the first non-finite step; step 0: none

    def _nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """A 0-d bool tensor on the loss's device: non-finite on any rank."""
        values = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        flag = (~torch.isfinite(values)).any().to(torch.float32).reshape(1)
        return self.dist.sum(flag)[0] > 0

    def allows_update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Before the optimizer step: under `skip`, False (and a warning) when step `step` is non-finite; always
        True under `stop` (without a host sync).

        Raises:
            TrainingDiverged: more than `max_skips` steps were skipped.
        """
        if self.policy != "skip" or not bool(self._nonfinite(loss, grad_norm)):
            return True
        self.skips += 1
        what = f"step {step}: loss {float(loss):.4g}, gradient norm {float(grad_norm):.4g}"
        if self.skips > self.max_skips:
            raise TrainingDiverged(
                f"{what}: {self.skips} non-finite steps exceed task.max_nonfinite_skips={self.max_skips}; "
                f"training stopped and this state was not saved; {ADVICE}"
            )
        log.warning(
            "%s: non-finite, update skipped (%d of task.max_nonfinite_skips=%d)", what, self.skips, self.max_skips
        )
        return False

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """After each step, under `stop`: remember the first non-finite step, on the device (no host sync)."""
        if self.policy != "stop":
            return
        bad = self._nonfinite(loss, grad_norm)
        if self._first is None:
            self._first = torch.zeros(3, device=bad.device)
        record = bad & (self._first[0] == 0)
        values = torch.stack([torch.full_like(self._first[0], step), loss.detach().float(), grad_norm.detach().float()])
        self._first = torch.where(record, values.to(self._first.device), self._first)

    def check(self) -> None:
        """`stop`: raise if any step observed so far was non-finite (one host sync).

        Raises:
            TrainingDiverged: naming the first non-finite step, its loss and gradient norm.
        """
        if self._first is None:
            return
        step, loss, grad_norm = self._first.tolist()
        if step:
            raise TrainingDiverged(
                f"step {int(step)}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: training stopped and no "
                f"checkpoint or export holds the diverged weights; {ADVICE}"
            )


def training_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state dict and the optimizer's state, named by parameter (what a checkpoint holds); of sharded
    tensors this rank's rows."""
    yield from ((name, local(value)) for name, value in model.state_dict().items())
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            yield f"optimizer {key} of {names.get(id(param), 'an unnamed parameter')}", local(value)

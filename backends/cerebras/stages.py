"""Training on cstorch in stages, on the CS-2 appliance's terms (`shared/CEREBRAS_APPLIANCE.md` sections 0, 2, 3).

- Data: one `cstorch.utils.data.DataLoader(train_input, <corpus cache train.npy>, batch_size, seed)` for the
  whole run (`modelzoo.data.csx_input`: the input workers import it; nothing of the corpus is pickled), its
  position restored from the loop's data position before the first executor and saved in every checkpoint.
- Stages: one `DataExecutor` per evaluation period, with `checkpoint_steps` at the global steps that are
  multiples of `task.checkpoint_every` (also after a resume) and the executor's last step.
- The traced step is the loop's `train_step`; its step closure only logs the tensors handed to it (loss,
  gradient norm, learning rate, each sparse weight's level from cstorch's computed-sparsity hook). Step counting
  and the progress bar run on the host after each step; evaluation and checkpoint conversion between executors.
- Checkpoints: a `cstorch.checkpoint_closure` writes `cstorch.save` files with the Model Zoo's keys to
  `<run_dir>/cerebras/checkpoints/`; after each executor they become our checkpoint directories
  (`run_checkpoint_to_checkpoint`), which resume, export and the run summary read.
- Evaluation: a traced `no_grad` step in its own executor over a fresh `DataLoader(eval_input, ...)` of full
  `task.micro_batch_size` batches, between `model.eval()` and `model.train()`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modelzoo import checkpoint as ckpt
from modelzoo.backends.cerebras.checkpoint import modelzoo_metadata, run_checkpoint_to_checkpoint
from modelzoo.backends.cerebras.environment import import_cstorch
from modelzoo.config import Config
from modelzoo.data.csx_input import eval_input, read_blocks, train_input
from modelzoo.errors import ConfigError
from modelzoo.train.metrics import perplexity

if TYPE_CHECKING:
    from modelzoo.backends.base import LoopDriver

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # under the backend's artifact directory


def checkpoint_steps(start: int, steps: int, every: int) -> Any:
    """The `checkpoint_steps` of an executor of `steps` steps after global step `start`: the zero-based iterations
    that end a global step divisible by `every`, also after a resume (Model Zoo's `RunSchedule` aligns them with
    the fit's start step instead, so a resumed run of theirs checkpoints at other steps), and its last iteration."""
    schedule = import_cstorch().utils.data.utils.Schedule
    first = every - start % every - 1
    return schedule([schedule.Range(start=min(first, steps - 1), end=steps, step=every, include_last=True)])


def cstorch_checkpoints(artifact_dir: Path) -> dict[int, Path]:
    """The complete `cstorch.save` checkpoint files of a run, by global step."""
    found = {}
    for path in (artifact_dir / CHECKPOINTS).glob("checkpoint_*.mdl"):
        found[int(path.stem.removeprefix("checkpoint_"))] = path
    return found


def convert_new_checkpoints(artifact_dir: Path, run_dir: Path, keep: int) -> None:
    """Our checkpoint directory for each `cstorch.save` file newer than the run's latest one, on the user node;
    then the `cstorch.save` files but the newest `keep` are deleted (converted, they rotate as ours do)."""
    latest = ckpt.latest_checkpoint(run_dir)
    done = ckpt.verify_checkpoint(latest)["step"] if latest else -1
    files = sorted(cstorch_checkpoints(artifact_dir).items())
    for step, path in files:
        if step > done:
            run_checkpoint_to_checkpoint(path, run_dir, keep)
            log.info("converted %s to %s", path, ckpt.latest_checkpoint(run_dir))
    for _, path in files[:-keep]:
        path.unlink()


class StagedRun:
    """A pre-training loop driven through cstorch executors (module docstring); it uses the loop only through
    `LoopDriver`."""

    def __init__(self, loop: LoopDriver, artifact_dir: Path, cfg: Config, levels: dict[str, torch.Tensor]) -> None:
        """`levels`: each sparse weight's mask level, which cstorch's computed-sparsity hook fills in each traced
        optimizer step (`CerebrasSparsity.levels`)."""
        self.cstorch = import_cstorch()
        self.loop = loop
        self.artifact_dir = artifact_dir
        self.cfg = cfg
        self.train_file, self.validation_file = (str(f) for f in loop.data_files())
        validation = read_blocks(self.validation_file)
        size, limit = self.cfg.task.micro_batch_size, self.cfg.task.eval_batches
        check_eval_batches(len(validation), size)
        full = len(validation) // size
        self.eval_steps = full if limit is None else min(limit, full)
        if self.eval_steps < (math.ceil(len(validation) / size) if limit is None else limit):
            log.warning("evaluating %d full batches of %d: a CS-2 leaves out a last, shorter one", full, size)
        self.eval_tokens = self.eval_steps * size * (validation.shape[1] - 1)
        self.train_loader = self.cstorch.utils.data.DataLoader(
            train_input, self.train_file, loop.settings.batch_size, self.cfg.seed
        )
        self.sparse = loop.sparse_names()
        self.levels = levels
        self._eval_sums: list[float] = []

    # ---- the programs ---------------------------------------------------------------------------------
    def train_program(self, on_step: Callable[..., None] | None = None) -> Callable[..., None]:
        """The traced training step; its step closure (`on_step`, else the metrics row) gets the loss, gradient
        norm, learning rate and each sparse weight's level as tensors and nothing else."""
        loop, cstorch = self.loop, self.cstorch
        log_step = cstorch.step_closure(on_step or self._log_step)

        @cstorch.trace
        def train(inputs: torch.Tensor, targets: torch.Tensor) -> None:
            micro = tuple(t.reshape(loop.accumulation, -1, t.shape[-1]) for t in (inputs, targets))
            loss, grad_norm, lr = loop.train_step(*micro)
            log_step(loss, grad_norm, lr, *(self.levels[n] for n in self.sparse))

        return train

    def _log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: torch.Tensor, *levels: torch.Tensor) -> None:
        """The step closure: hands the loop this step's values (each weight's sparsity read only where a row is
        logged)."""
        logged = self.loop.log_due()
        per_weight = dict(zip(self.sparse, (float(v) for v in levels), strict=True)) if logged else {}
        self.loop.after_step(loss, grad_norm, lr, per_weight)

    def eval_program(self) -> Callable[..., None]:
        """The traced evaluation step (forward only); its step closure adds up the losses it is handed."""
        loop, cstorch = self.loop, self.cstorch
        add_loss = cstorch.step_closure(self._add_eval_loss)

        @cstorch.trace
        @torch.no_grad()
        def evaluate(inputs: torch.Tensor, targets: torch.Tensor) -> None:
            add_loss(loop.eval_loss(inputs, targets), targets.numel())

        return evaluate

    def _add_eval_loss(self, loss: torch.Tensor, tokens: int) -> None:
        self._eval_sums.append(float(loss) * tokens)

    # ---- the run ------------------------------------------------------------------------------------
    def one_step_each(self) -> dict[str, Callable[[], None]]:
        """One training and one evaluation step, each in its executor and with nothing kept: what compile_only
        and validate_only lower."""
        data = self.cstorch.utils.data
        train, evaluate = self.train_program(on_step=lambda *values: None), self.eval_program()

        def training() -> None:
            for batch in data.DataExecutor(self.train_loader, num_steps=1):
                train(*batch)

        def evaluation() -> None:
            self.loop.model.eval()
            for batch in data.DataExecutor(self._eval_loader(), num_steps=1):
                evaluate(*batch)
            self.loop.model.train()

        return {"training": training, "evaluation": evaluation}

    def run(self) -> None:
        """Train from the loop's step to its last, evaluating and checkpointing between executors."""
        loop, settings = self.loop, self.loop.settings
        # The workers' aggregate state (`TrainBatches`, the Model Zoo's form): global samples streamed.
        self.train_loader.load_state_dict({"samples_streamed": loop.data_position()})
        train, evaluate = self.train_program(), self.eval_program()
        save = self.cstorch.checkpoint_closure(self._save)
        with loop.session():
            while loop.step < settings.max_steps:
                first = loop.step
                last = min((first // settings.eval_every + 1) * settings.eval_every, settings.max_steps)
                executor = self.cstorch.utils.data.DataExecutor(
                    self.train_loader,
                    num_steps=last - first,
                    checkpoint_steps=checkpoint_steps(first, last - first, settings.checkpoint_every),
                )
                for batch in executor:
                    train(*batch)
                    loop.count_step()
                    if loop.save_due():
                        save(loop.step)
                convert_new_checkpoints(self.artifact_dir, loop.run_dir, settings.keep_checkpoints)
                if loop.eval_due():
                    loop.log_evaluation(self._evaluate(evaluate))

    def _evaluate(self, evaluate: Callable[..., None]) -> dict[str, float]:
        """Mean validation loss over the fixed-size batches, in an executor of its own over a fresh loader."""
        self._eval_sums = []
        self.loop.model.eval()
        for batch in self.cstorch.utils.data.DataExecutor(self._eval_loader(), num_steps=self.eval_steps):
            evaluate(*batch)
        self.loop.model.train()
        val_loss = sum(self._eval_sums) / self.eval_tokens
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}

    def _eval_loader(self) -> Any:
        """A fresh loader over the validation file: each evaluation streams it from its start."""
        return self.cstorch.utils.data.DataLoader(
            eval_input, self.validation_file, self.cfg.task.micro_batch_size, self.cfg.task.eval_batches
        )

    def _save(self, step: int) -> None:
        """The checkpoint closure: the Model Zoo's keys with `cstorch.save` (written whole, then renamed)."""
        loop = self.loop
        dataloader = self.train_loader.state_dict()
        loop.set_data_position(dataloader["samples_streamed"])  # the host's data position follows the workers'
        record = loop.checkpoint_state()
        state = record["state"]
        cs_state = {
            "model": loop.model.state_dict(),
            "optimizer": loop.optimizer.state_dict(),
            "schedulers": [state.pop("scheduler")],
            "dataloader": dataloader,
            "global_step": step,
            "__metadata__": modelzoo_metadata(self.cfg, type(loop.model).__name__, self.cstorch.__version__),
            "modelzoo_config": record["config_yaml"],
        }
        if record["identity"] is not None:  # what a resume must keep beyond the config
            cs_state["modelzoo_identity"] = record["identity"]
        for key in ("sparsity", "grad_scaler"):
            if state[key] is not None:
                cs_state[key] = state[key]
            del state[key]
        del state["step"]
        cs_state["modelzoo_state"] = state
        path = self.artifact_dir / CHECKPOINTS / f"checkpoint_{step}.mdl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        self.cstorch.save(cs_state, str(tmp))
        os.replace(tmp, path)


def check_eval_batches(validation_blocks: int, batch_size: int) -> None:
    """A CS-2 evaluates full batches only: refuse a validation set smaller than one."""
    if validation_blocks < batch_size:
        raise ConfigError(
            "task.micro_batch_size",
            f"the validation set has {validation_blocks} blocks, fewer than one evaluation batch of "
            f"task.micro_batch_size={batch_size} (backend=cerebras evaluates full batches only): lower "
            "task.micro_batch_size or data.seq_len, or add validation documents",
        )

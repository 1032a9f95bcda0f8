"""What a resumed run must share with its checkpoint, and what it may change.

A checkpoint's `config.yaml` holds the model, sparsity, tokenizer settings, sequence length, global batch and
seed, which the loop's resume compares key by key (`TrainLoop.resume`). What the config does not show is recorded
beside it as the run's identity (`identity.json`): the training and validation documents by content, where they
came from, the tokenizer by its full definition (a retrained or edited tokenizer under the same settings), and a
distillation teacher (`task.distill.teacher`) by its directory and files, since the teacher is not checkpointed.
Changing any of them under a checkpoint silently changes what the saved state means (embeddings of remapped token
ids, data positions in other documents), so a resume that does is refused, naming the key and the saved value.

Optimizer hyperparameters (`optim.*`) are the other way round: on resume the config's values apply (learning
rate, betas, eps, weight decay, warm-up, decay, clipping), the checkpoint contributing only the moments and
step counts. Lowering `optim.lr` after a loss spike is the usual reason to resume with other values; every
value that differs from the saved run's is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from modelzoo.config import Config
from modelzoo.data.config import resolve_sources
from modelzoo.data.documents import SPLITS, split_files, split_key
from modelzoo.data.prepare import tokenizer_fingerprint
from modelzoo.errors import CheckpointError
from modelzoo.train.distill import KEY, teacher_identity

log = logging.getLogger(__name__)
# Applied to the restored optimizer's parameter groups from a freshly built one (`lr` via the schedule).
OPTIMIZER_HYPERPARAMETERS = ("initial_lr", "betas", "eps", "weight_decay")


def run_identity(cfg: Config, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The identity of run `cfg` trained with `tokenizer`, as stored in each checkpoint (JSON values)."""
    sources = resolve_sources(cfg.data)  # one source, or each of a mixture with its weight
    documents = [[s.name, w, {split: split_key(s, split) for split in SPLITS}] for s, w in sources]
    return {
        "data.documents": hashlib.sha256(json.dumps(documents, sort_keys=True).encode()).hexdigest(),
        "data.sources": [
            {"name": s.name, "weight": w, **{split: split_files(s, split) or s.hub_name for split in SPLITS}}
            for s, w in sources
        ]
        if cfg.data.sources
        else {split: split_files(cfg.data, split) or cfg.data.hub_name for split in SPLITS},
        "tokenizer.fingerprint": tokenizer_fingerprint(tokenizer),
        KEY: teacher_identity(cfg.task.distill.teacher) if cfg.task.distill.enabled else None,
    }


def check_identity(checkpoint: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume `checkpoint` (identity `saved`) as a run of identity `current`, naming the first change.

    Raises:
        CheckpointError: a key differs, or the checkpoint records no identity.
    """
    if saved is None:
        raise CheckpointError(
            f"{checkpoint} records no run identity (written by an older version), so a resume cannot check that "
            "the data, tokenizer and model are the same; export it (modelzoo export) and start a new run from "
            "it with task.init_from=<the export>"
        )
    for key, value in current.items():
        if key == "data.sources" or saved.get(key) == value:
            continue
        if key == "data.documents":
            changed = first_difference("data", saved["data.sources"], current["data.sources"])
            where = (
                f"{changed[0]}={changed[1]}, but the config reads {changed[2]}"
                if changed
                else "the same files, but their content or data.name (the corpus's name) changed"
            )
            raise CheckpointError(
                f"{checkpoint} was trained on other documents: {where} (content sha256 {saved[key][:12]}, now "
                f"{value[:12]}); resume with the original data.train_files / data.validation_files (and their "
                "content) or start a new run_dir"
            )
        raise CheckpointError(
            f"{checkpoint} was trained with {key}={saved.get(key)} but the config gives {key}={value}: that "
            "changes what the saved state means; resume with the original value or start a new run_dir"
        )


def first_difference(key: str, a: object, b: object) -> tuple[str, object, object] | None:
    """The first leaf where the plain values `a` and `b` differ, as (its dotted key under `key`, a's, b's): a
    refusal names `sparsity.sparsity`, not two whole `sparsity` blocks. None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for name in sorted(a.keys() | b.keys(), key=str):
            changed = first_difference(f"{key}.{name}", a.get(name), b.get(name))
            if changed is not None:
                return changed
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            changed = first_difference(f"{key}[{i}]", x, y)
            if changed is not None:
                return changed
        return None
    return None if a == b else (key, a, b)


def apply_optimizer_config(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    fresh_groups: list[dict[str, Any]],
    fresh_base_lrs: list[float],
) -> None:
    """After loading a checkpoint into `optimizer` and `scheduler`: the config's hyperparameters, captured from
    the freshly built ones (`fresh_groups` without their params, `fresh_base_lrs`), replace the saved ones, and
    the learning rate of the next step is recomputed from the config's schedule at the restored step."""
    scheduler.base_lrs = list(fresh_base_lrs)
    for group, fresh, fn, base_lr in zip(
        optimizer.param_groups, fresh_groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True
    ):
        for key in OPTIMIZER_HYPERPARAMETERS:
            if key in fresh:
                group[key] = fresh[key]
        lr = base_lr * fn(scheduler.last_epoch)  # as LambdaLR.get_lr, so an unchanged config resumes bit for bit
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def log_optimizer_changes(checkpoint: Path, saved_optim: dict[str, Any], optim: dict[str, Any]) -> None:
    """Log each `optim.*` value the resumed run changes (they apply; see the module docstring)."""
    for key, value in optim.items():
        if saved_optim.get(key) != value:
            log.warning(
                "resume: optim.%s=%s applies (%s was trained with %s)", key, value, checkpoint, saved_optim.get(key)
            )

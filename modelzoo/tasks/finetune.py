"""`modelzoo finetune` / `modelzoo prompt-tune`: adapt a pre-trained checkpoint to PubMedQA or HoC.

A task adapter of the shared training loop (`modelzoo.train.loop`): the head (`modelzoo.finetune.heads`) gives the
examples, the loss and the dev / test scores; `Finetuning` gives the loop its batches (`ExampleBatches`), its
evaluation (dev score, model selection) and its resumable state. The loop brings micro-batching, autocast, DDP
under torchrun, clipping, checkpoints every evaluation and exact resume (`task.resume=true`). At the end the best
dev checkpoint is marked as the run's (`checkpoints/best`), loaded, scored on test and exported (HF directory, and
for soft prompts a PEFT adapter).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from modelzoo import checkpoint as ckpt
from modelzoo.backends import get_backend
from modelzoo.backends.base import Backend
from modelzoo.config import Config
from modelzoo.config.finetune import FinetuneConfig, PromptTuneConfig, default_data_dir, output_dir
from modelzoo.downstream.evaluate import checkpoint_flops
from modelzoo.errors import CheckpointError
from modelzoo.finetune.data import ExampleBatches
from modelzoo.finetune.heads import Head, HoCHead, LMHead
from modelzoo.flops import TRAIN_MULTIPLIER, flop_report, format_flops
from modelzoo.models.soft_prompt import SoftPrompt, freeze
from modelzoo.restore import Restored, restore_model
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.train.assemble import RunPlace, assemble_loop, open_run
from modelzoo.train.loop import Forward, LoopSettings, mask_buffer_names
from modelzoo.validate import validated_config

log = logging.getLogger(__name__)

COLUMNS = ("step", "examples", "train_loss", "lr", "grad_norm", "examples_per_s", "sparsity", "dev_score")
# Keys a resumed fine-tuning run must share with its checkpoint.
RESUME_KEYS = ("task.pretrained", "task.dataset", "task.sparsity", "task.batch_size", "task.seq_len", "seed")


@dataclass
class FinetuneSummary:
    task: str
    dataset: str
    sparsity: str
    steps: int
    best_step: int
    examples_per_s: float
    trainable_params: int
    dev: dict
    test: dict
    pretrain_flops: float | None  # sparse-effective FLOPs of the pre-training up to the checkpoint used
    finetune_flops: float  # training FLOPs of this run over the tokens it processed (sparse-effective under keep)
    finetune_dense_flops: float  # the same tokens at dense FLOPs
    nonzero_fraction: float  # of the weights the pre-training masked, after this run
    checkpoint: str
    exports: dict


def build_prompt(task: PromptTuneConfig, pre: Restored, seed: int) -> SoftPrompt:
    prompt = SoftPrompt(task.num_virtual_tokens, pre.model.config.n_embd)
    wte = pre.model.embedding.weight[: pre.model.config.vocab_size]  # no padded rows
    if task.init == "text":
        prompt.init_from_text(wte, pre.tokenizer(task.init_text, add_special_tokens=False)["input_ids"])
    else:
        prompt.init_from_vocab(wte, torch.Generator().manual_seed(seed))
    return prompt


class Finetuning:
    """The loop's task for fine-tuning and soft prompting: batches of examples, the head's loss, dev-score model
    selection (the best step's checkpoint is kept from rotation)."""

    unit = "examples"
    columns = COLUMNS

    def __init__(self, head: Head, batches: ExampleBatches, task: FinetuneConfig, device: torch.device) -> None:
        self.head, self.examples, self.task, self.device = head, batches, task, device
        self.name = task.name
        self.units_per_step = task.batch_size
        self.best: dict = {"score": -math.inf, "step": 0, "dev": {}}

    def batches(self) -> ExampleBatches:
        return self.examples

    def loss(self, forward: Forward, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.head.loss(forward, inputs, targets)

    def loss_terms(self) -> dict[str, torch.Tensor]:
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        score, dev = self.head.dev(self.device)
        if score > self.best["score"]:
            self.best = {"score": score, "step": step, "dev": dev}
        return {"dev_score": score}

    def protected_checkpoints(self) -> tuple[str, ...]:
        return (f"step_{self.best['step']:06d}",) if self.best["step"] else ()

    def state_dict(self) -> dict:
        return {"examples": self.examples.state_dict(), "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.examples.load_state_dict(state["examples"])
        self.best = state["best"]


def run(cfg: Config) -> FinetuneSummary:
    """Fine-tune (or soft-prompt) the pre-trained run of a validated `cfg` through the shared loop."""
    task = cfg.task
    if task.data_dir is None:
        task = dataclasses.replace(task, data_dir=default_data_dir(task.dataset))
    backend = get_backend("masked_dense")  # the only one fine-tuning runs on (validate refuses the others)
    place = open_run(task.device, output_dir(task), task.resume, backend, task.keep_checkpoints)
    try:
        return _train(cfg, task, place, backend)
    finally:
        place.release()


def _train(cfg: Config, task: FinetuneConfig, place: RunPlace, backend: Backend) -> FinetuneSummary:
    prompt_tuning = isinstance(task, PromptTuneConfig)
    dist, device, run_dir = place.dist, place.device, place.run_dir
    checkpoint = ckpt.find_checkpoint(task.pretrained, "task.pretrained")
    torch.manual_seed(cfg.seed)
    pre = restore_model(checkpoint, masks="held" if task.sparsity == "keep" else "none")
    if pre.tokenizer is None:
        raise CheckpointError(f"{checkpoint.parent.parent / 'tokenizer'} is missing: it is needed to encode the data")
    if pre.tokenizer.pad_token is None:
        pre.tokenizer.pad_token = pre.tokenizer.eos_token
    virtual = task.num_virtual_tokens if prompt_tuning else 0
    seq_len = task.seq_len or pre.model.config.n_positions - virtual
    prompt = None
    if prompt_tuning:
        freeze(pre.model)
        prompt = build_prompt(task, pre, cfg.seed)
    head = (LMHead if task.dataset == "pubmedqa" else HoCHead)(task, pre, seq_len, prompt)
    model = head.model.to(device)
    optim = dataclasses.replace(cfg.optim, lr=task.lr) if task.lr else cfg.optim
    sparsifier = pre.sparsifier if not prompt_tuning else None
    examples = ExampleBatches(
        head.example, head.train_size, head.pad, task.batch_size, task.micro_batch_size, cfg.seed,
        dist.rank, dist.world_size,
    )  # fmt: skip
    adapter = Finetuning(head, examples, task, device)
    saved_cfg = dataclasses.replace(
        cfg,
        task=task,
        model=pre.config.model,
        tokenizer=pre.config.tokenizer,
        sparsity=pre.config.sparsity if task.sparsity == "keep" else SparsityConfig(),
        run_dir=str(run_dir),
    )
    loop = assemble_loop(
        place,
        task=adapter,
        model=model,
        forward=backend.compile(model),
        backend=backend,
        sparsifier=sparsifier,
        optim=optim,
        # a checkpoint at every evaluation: model selection picks among checkpoints
        settings=LoopSettings.of(task, optim.grad_clip, checkpoint_every=task.eval_every),
        config=saved_cfg,
        tokenizer=pre.tokenizer,
        mask_names=mask_buffer_names(model),
        resume=(RESUME_KEYS, "give a new task.output_dir") if task.resume else None,
    )
    trainable = sum(p.numel() for p in loop.trainable)
    log.info(
        "%s %s from %s (%s): %d trainable parameters, %d tokens per example",
        task.name, task.dataset, checkpoint, task.sparsity, trainable, seq_len,
    )  # fmt: skip
    loop.fit()

    best_step, dev = adapter.best["step"], adapter.best["dev"]
    best = ckpt.checkpoint_dir(run_dir) / f"step_{best_step:06d}"
    ckpt.load_model_weights(best, model, loop.mask_names)
    test = head.test(device)
    log.info("best dev at step %d: %s; test: %s", best_step, _format(dev), _format(test))
    exports: dict = {}
    if dist.is_main:
        ckpt.mark_best(run_dir, best)
        info = {"base_checkpoint": str(checkpoint), "task": task.name, "dataset": task.dataset, "step": best_step}
        if pre.sparsifier:
            info.update(pre.config.sparsity.summary())
        exports = head.export(run_dir, info) if task.export else {}
    stage_flops = _finetune_flops(pre, task, seq_len + virtual, examples.tokens + virtual * loop.step * task.batch_size)
    summary = FinetuneSummary(
        task=task.name,
        dataset=task.dataset,
        sparsity=task.sparsity,
        steps=loop.step,
        best_step=best_step,
        examples_per_s=loop.step * task.batch_size / max(loop.train_seconds, 1e-9),
        trainable_params=trainable,
        dev=dev,
        test=test,
        pretrain_flops=_pretrain_flops(checkpoint),
        finetune_flops=stage_flops[0],
        finetune_dense_flops=stage_flops[1],
        nonzero_fraction=_masked_nonzero(pre.model, checkpoint),
        checkpoint=str(best),
        exports=exports,
    )
    place.write_summary(summary)
    return summary


def _masked_nonzero(backbone: torch.nn.Module, checkpoint: Path) -> float:
    """Fraction of the pre-training's pruned positions that are nonzero now (0 under `keep`, > 0 after dense)."""
    masks = ckpt.checkpoint_masks(checkpoint)
    if not masks:
        return 0.0
    params = dict(backbone.named_parameters())
    pruned = nonzero = 0
    for key, mask in masks.items():
        weight = params[key.removesuffix(MASK_SUFFIX)].detach().cpu()
        pruned += int((~mask).sum())
        nonzero += int((weight[~mask] != 0).sum())
    return nonzero / max(pruned, 1)


def _pretrain_flops(checkpoint: Path) -> float | None:
    """Sparse-effective training FLOPs up to `checkpoint` (not the whole run's: it may be an earlier one)."""
    flops = checkpoint_flops(checkpoint)
    return flops[0] if flops else None


def _finetune_flops(pre: Restored, task: FinetuneConfig, context: int, tokens: int) -> tuple[float, float]:
    """(training FLOPs, dense training FLOPs) over `tokens` of `context`-token inputs (6N per token +
    attention); the first is sparse-effective under `keep` (at the masks held, those the pre-training ended
    with), dense otherwise. The HoC classifier computes no LM head (its 10-way score layer is left out, like
    norms), so that term is dropped for it."""
    sparsity = pre.sparsifier.config if task.sparsity == "keep" and pre.sparsifier else None
    report = flop_report(pre.model.config, context, sparsity)
    terms = [t for t in report.terms if task.dataset == "pubmedqa" or t.name != "lm head"]
    return (
        TRAIN_MULTIPLIER * sum(t.sparse for t in terms) * tokens,
        TRAIN_MULTIPLIER * sum(t.dense for t in terms) * tokens,
    )


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def format_summary(s: FinetuneSummary) -> str:
    flops = f"fine-tuning {format_flops(s.finetune_flops)}"
    if s.pretrain_flops is not None:
        flops += f", pre-training (sparse-effective) {format_flops(s.pretrain_flops)}"
    lines = [
        "=" * 72,
        f"{s.task} {s.dataset} ({s.sparsity}): {s.steps} steps, {s.examples_per_s:.1f} examples/s, "
        f"{s.trainable_params:,} trainable parameters",
        f"dev (best, step {s.best_step})  {_format(s.dev)}",
        f"test             {_format(s.test)}",
        f"pruned weights   {s.nonzero_fraction:.1%} nonzero after this run",
        f"training FLOPs   {flops}",
        f"checkpoint       {s.checkpoint}",
        *(f"{k:<16} {v}" for k, v in s.exports.items()),
        "=" * 72,
    ]
    return "\n".join(lines)


def finetune(overrides: list[str]) -> None:
    print(format_summary(run(validated_config(overrides, "finetune"))))


def prompt_tune(overrides: list[str]) -> None:
    print(format_summary(run(validated_config(overrides, "prompt_tune"))))

"""`modelzoo finetune` / `modelzoo prompt_tune`: adapt a pre-trained checkpoint to PubMedQA or HoC.

The loop reuses the pre-training pieces (AdamW and LR schedule, atomic checkpoints, metrics CSV/TensorBoard,
the sparsity plug-in, a tqdm bar): every `eval_every` steps the head is scored on dev and the best state is
kept; at the end it is restored, scored on test, checkpointed and exported (HF directory, and for soft
prompts a PEFT adapter).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from modelzoo.config import Config, resolved_device
from modelzoo.downstream.evaluate import checkpoint_flops
from modelzoo.finetune.config import PromptTuneConfig, default_data_dir, output_dir, pretrained_config
from modelzoo.finetune.data import shuffled_batches
from modelzoo.finetune.heads import Head, HoCHead, LMHead
from modelzoo.finetune.pretrained import Pretrained, load_pretrained
from modelzoo.flops import TRAIN_MULTIPLIER, flop_report, format_flops
from modelzoo.models.soft_prompt import SoftPrompt, freeze
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MASK_SUFFIX
from modelzoo.train import checkpoint as ckpt
from modelzoo.train.metrics import MetricsLogger
from modelzoo.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

COLUMNS = ("step", "examples", "train_loss", "lr", "grad_norm", "examples_per_s", "sparsity", "dev_score")


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


def build_prompt(task: PromptTuneConfig, pre: Pretrained, seed: int) -> SoftPrompt:
    prompt = SoftPrompt(task.num_virtual_tokens, pre.model.config.n_embd)
    wte = pre.model.transformer.wte.weight[: pre.model.config.vocab_size]  # no padded rows
    if task.init == "text":
        prompt.init_from_text(wte, pre.tokenizer(task.init_text, add_special_tokens=False)["input_ids"])
    else:
        prompt.init_from_vocab(wte, torch.Generator().manual_seed(seed))
    return prompt


def _masked_nonzero(pre: Pretrained, checkpoint: Path) -> float:
    """Fraction of the pre-training's pruned positions that are nonzero now (0 under `keep`, > 0 after dense)."""
    from modelzoo.finetune.pretrained import checkpoint_masks

    masks = checkpoint_masks(checkpoint)
    if not masks:
        return 0.0
    params = dict(pre.model.named_parameters())
    pruned = nonzero = 0
    for key, mask in masks.items():
        weight = params[key.removesuffix(MASK_SUFFIX)].detach().cpu()
        pruned += int((~mask).sum())
        nonzero += int((weight[~mask] != 0).sum())
    return nonzero / max(pruned, 1)


def run(cfg: Config) -> FinetuneSummary:
    task = cfg.task
    if task.data_dir is None:
        task = dataclasses.replace(task, data_dir=default_data_dir(task.dataset))
    prompt_tuning = isinstance(task, PromptTuneConfig)
    run_dir = output_dir(task)
    ckpt.check_run_dir(run_dir, resume=False)
    checkpoint, _ = pretrained_config(task.pretrained)
    device = torch.device(resolved_device(task.device))
    torch.manual_seed(cfg.seed)
    pre = load_pretrained(checkpoint, keep_masks=task.sparsity == "keep", seed=cfg.seed)
    virtual = task.num_virtual_tokens if prompt_tuning else 0
    seq_len = task.seq_len or pre.model.config.n_positions - virtual
    prompt = None
    if prompt_tuning:
        freeze(pre.model)
        prompt = build_prompt(task, pre, cfg.seed)
    head = (LMHead if task.dataset == "pubmedqa" else HoCHead)(task, pre, seq_len, prompt)
    model = head.model.to(device)
    optim = dataclasses.replace(cfg.optim, lr=task.lr) if task.lr else cfg.optim
    optimizer = build_optimizer(model, optim)
    if pre.sparsifier and not prompt_tuning:
        pre.sparsifier.apply_optimizer(optimizer)
    scheduler = build_scheduler(optimizer, optim, task.max_steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if task.precision == "bf16" else nullcontext()
    accumulation = task.batch_size // task.micro_batch_size
    batches = shuffled_batches(head.train_size, task.micro_batch_size, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    pre.tokenizer.save_pretrained(run_dir / "tokenizer")
    metrics = MetricsLogger(run_dir, columns=COLUMNS)
    log.info(
        "%s %s from %s (%s): %d trainable parameters, %d tokens per example",
        task.name,
        task.dataset,
        checkpoint,
        task.sparsity,
        trainable,
        seq_len,
    )

    best: tuple[float, int, dict, dict] = (-math.inf, 0, {}, {})
    tokens = 0
    train_seconds = 0.0
    refresh = 0.1 if sys.stderr.isatty() else 30.0
    with tqdm(total=task.max_steps, desc=task.name, unit="step", mininterval=refresh) as bar:
        for step in range(1, task.max_steps + 1):
            start = time.perf_counter()
            model.train()
            total = 0.0
            for _ in range(accumulation):
                with autocast:
                    loss, n_tokens = head.loss(next(batches), device)
                (loss / accumulation).backward()
                total += float(loss.detach()) / accumulation
                tokens += n_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], optim.grad_clip
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - start
            bar.update(1)
            row: dict[str, float] = {}
            if step % task.log_every == 0 or step == task.max_steps:
                row.update(
                    train_loss=total,
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=float(grad_norm),
                    examples_per_s=step * task.batch_size / train_seconds,
                )
                if pre.sparsifier and not prompt_tuning:
                    row["sparsity"] = pre.sparsifier.stats().global_sparsity
                bar.set_postfix(refresh=False, loss=f"{total:.3f}")
            if step % task.eval_every == 0 or step == task.max_steps:
                score, dev = head.dev(device)
                row["dev_score"] = score
                bar.write(f"step {step}: dev {_format(dev)}")
                if score > best[0]:
                    best = (score, step, dev, head_state(head))
            if row:
                metrics.log(step, examples=step * task.batch_size, **row)
    metrics.close()

    _, best_step, dev, state = best
    load_head_state(head, state)
    test = head.test(device)
    log.info("best dev at step %d: %s; test: %s", best_step, _format(dev), _format(test))
    saved_cfg = dataclasses.replace(
        cfg,
        task=task,
        model=pre.config.model,
        tokenizer=pre.config.tokenizer,
        sparsity=pre.config.sparsity if task.sparsity == "keep" else SparsityConfig(),
        run_dir=str(run_dir),
    )
    path = ckpt.save_checkpoint(
        run_dir,
        best_step,
        model,
        optimizer.state_dict(),
        {"step": best_step, "test": test},
        OmegaConf.to_yaml(OmegaConf.structured(saved_cfg)),
        keep=1,
    )
    info = {"base_checkpoint": str(checkpoint), "task": task.name, "dataset": task.dataset, "step": best_step}
    if pre.sparsifier:
        info.update(pre.config.sparsity.summary())
    exports = head.export(run_dir, info) if task.export else {}
    stage_flops = _finetune_flops(pre, task, seq_len + virtual, tokens + virtual * task.max_steps * task.batch_size)
    summary = FinetuneSummary(
        task=task.name,
        dataset=task.dataset,
        sparsity=task.sparsity,
        steps=task.max_steps,
        best_step=best_step,
        examples_per_s=task.max_steps * task.batch_size / max(train_seconds, 1e-9),
        trainable_params=trainable,
        dev=dev,
        test=test,
        pretrain_flops=_pretrain_flops(checkpoint),
        finetune_flops=stage_flops[0],
        finetune_dense_flops=stage_flops[1],
        nonzero_fraction=_masked_nonzero(pre, checkpoint),
        checkpoint=str(path),
        exports=exports,
    )
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def head_state(head: Head) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights (what model selection keeps)."""
    return {k: v.detach().clone() for k, v in head.model.named_parameters() if v.requires_grad}


def load_head_state(head: Head, state: dict[str, torch.Tensor]) -> None:
    params = dict(head.model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)


def _pretrain_flops(checkpoint: Path) -> float | None:
    """Sparse-effective training FLOPs up to `checkpoint` (not the whole run's: it may be an earlier one)."""
    flops = checkpoint_flops(checkpoint)
    return flops[0] if flops else None


def _finetune_flops(pre: Pretrained, task, context: int, tokens: int) -> tuple[float, float]:
    """(training FLOPs, dense training FLOPs) over `tokens` of `context`-token inputs (6N per token +
    attention); the first is sparse-effective under `keep`, dense otherwise. The HoC classifier computes no LM
    head (its 10-way score layer is left out, like norms), so that term is dropped for it."""
    sparsity = pre.config.sparsity if task.sparsity == "keep" else None
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

"""Benchmark fine-tuning throughput (examples/s): ours vs the same model run through `transformers` / `peft`.

What is measured is in `METHOD`, which also heads the section this writes to `docs/benchmarks.md`.
Usage: `python bench/finetune.py [--models tiny,med2] [--write]`; see `--help`.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import Timing, add_common_arguments, begin, markdown_table, publish, split_choices, time_interleaved
from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from train_step import SHAPES, Shape
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from modelzoo.config.train import OptimConfig
from modelzoo.export.hf import export_hf
from modelzoo.export.peft import save_prompt_adapter
from modelzoo.export.seq_cls import export_seq_cls
from modelzoo.finetune.data import IGNORE
from modelzoo.models.classifier import Classifier
from modelzoo.models.gpt import GPT
from modelzoo.models.soft_prompt import PromptedLM, SoftPrompt, freeze
from modelzoo.optim import build_optimizer

METHOD = """\
One fine-tuning step as `modelzoo finetune` / `modelzoo prompt_tune` take it: `zero_grad`, forward, loss,
backward, grad-norm clipping at 1.0 and an AdamW step over the trainable parameters (`build_optimizer`, default
`OptimConfig`), fp32, on the same batch for ours and for the Hugging Face model exported from ours (same
weights). Three tasks:
- PubMedQA fine-tuning: every weight trains; the loss is the cross-entropy of the answer tokens only (all other
  targets -100), computed the same way from either model's logits; HF is `GPT2LMHeadModel` (SDPA attention).
- HoC fine-tuning: a 10-way multi-label head on the last non-pad token, BCE loss; HF is
  `GPT2ForSequenceClassification` exported by `export_seq_cls`.
- PubMedQA soft prompting: 20 virtual tokens, backbone frozen; HF is `peft.get_peft_model` with our
  adapter's config and weights on the exported `GPT2LMHeadModel` (20 virtual + `seq` - 20 real positions).
Batches are `batch` rows of `seq` random tokens: tiny's 128-token window is always full on PubMedQA and HoC
(their prompts are longer), so full rows are the real shape. Timed in interleaved rounds; examples/s from
the median sample.
"""
SECTION = "Fine-tuning throughput: ours vs transformers / peft (bench/finetune.py)"
OPTIM = OptimConfig()
VIRTUAL = 20
ANSWER = 1  # answer tokens per example (" yes" / " no" / " maybe" are one token each in the tiny BPE)
TASKS = {"pubmedqa": "PubMedQA fine-tuning", "hoc": "HoC fine-tuning", "prompt": "PubMedQA soft prompting (20)"}


def _step(model: nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, OPTIM)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM.grad_clip)
        optimizer.step()

    return step


def _answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def fine_tuning_steps(shape: Shape, directory: Path, seed: int = 0) -> dict[str, Callable[[], None]]:
    """One step function per (task, implementation), each with its own copy of the same initial weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, shape.model.vocab_size, (shape.batch, shape.seq), generator=g)
    targets = torch.full_like(x, IGNORE)
    targets[:, -ANSWER:] = torch.randint(1, shape.model.vocab_size, (shape.batch, ANSWER), generator=g)
    xp, tp = x[:, VIRTUAL:], targets[:, VIRTUAL:]  # soft prompting: 20 virtual + seq - 20 real positions
    labels = (torch.rand(shape.batch, 10, generator=g) < 0.2).float()

    def ours() -> GPT:
        torch.manual_seed(seed)
        return GPT(shape.model).train()

    lm_dir = export_hf(ours(), directory / "lm")
    steps: dict[str, Callable[[], None]] = {}
    model = ours()
    steps["pubmedqa/ours"] = _step(model, lambda: model(x, targets)[1])
    hf = GPT2LMHeadModel.from_pretrained(lm_dir, attn_implementation="sdpa").train()
    steps["pubmedqa/hf"] = _step(hf, lambda: _answer_loss(hf(input_ids=x, use_cache=False).logits, targets))

    torch.manual_seed(seed)
    classifier = Classifier(ours(), 10, pad_token_id=0).train()
    cls_dir = export_seq_cls(classifier, directory / "cls", [f"h{i}" for i in range(10)])
    steps["hoc/ours"] = _step(classifier, lambda: F.binary_cross_entropy_with_logits(classifier(x), labels))
    hf_cls = GPT2ForSequenceClassification.from_pretrained(cls_dir, attn_implementation="sdpa").train()
    steps["hoc/hf"] = _step(
        hf_cls, lambda: F.binary_cross_entropy_with_logits(hf_cls(input_ids=x, use_cache=False).logits, labels)
    )

    backbone = ours()
    freeze(backbone)
    prompt = SoftPrompt(VIRTUAL, shape.model.n_embd)
    prompt.init_from_vocab(backbone.transformer.wte.weight, torch.Generator().manual_seed(seed))
    prompted = PromptedLM(backbone, prompt).train()
    steps["prompt/ours"] = _step(prompted, lambda: prompted(xp, tp)[1])
    adapter = save_prompt_adapter(prompt, directory / "adapter", shape.model, "causal_lm", lm_dir)
    # PEFT loads prompt adapters for inference only; for training it builds the model from the adapter's config.
    config = PeftConfig.from_pretrained(adapter)
    config.inference_mode = False
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(lm_dir, attn_implementation="sdpa"), config)
    set_peft_model_state_dict(peft_model, load_file(adapter / "adapter_model.safetensors"))
    peft_model.train()
    steps["prompt/hf"] = _step(
        peft_model, lambda: _answer_loss(peft_model(input_ids=xp, use_cache=False).logits[:, VIRTUAL:], tp)
    )
    return steps


def measure(shape: Shape, *, steps: int, warmup: int, repeats: int, seed: int = 0) -> dict[str, Timing]:
    with tempfile.TemporaryDirectory() as directory:
        fns = fine_tuning_steps(shape, Path(directory), seed)
        return time_interleaved(fns, warmup=warmup, repeats=repeats, number=steps)


def report(name: str, shape: Shape, timings: dict[str, Timing], steps: int) -> str:
    rows = []
    for task, label in TASKS.items():
        ours, theirs = timings[f"{task}/ours"].median, timings[f"{task}/hf"].median
        rows.append([label, f"{shape.batch / ours:,.1f}", f"{shape.batch / theirs:,.1f}", f"{theirs / ours:.2f}x"])
    reference = "transformers (`peft` for soft prompting)"
    table = markdown_table(["task", "ours, examples/s", f"{reference}, examples/s", "ours vs HF"], rows)
    head = (
        f"### {name}: {shape.model.n_layer} layers, d_model {shape.model.n_embd}, batch {shape.batch} x "
        f"{shape.seq} tokens, {steps} steps per sample"
    )
    return "\n\n".join([head, *([shape.note] if shape.note else []), table])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny", help=f"comma-separated shapes out of {sorted(SHAPES)}")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (default: 8, the recipe's)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round (default: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing (default: 2)")
    add_common_arguments(parser, repeats=5, seeded="weights and the batch")
    args = parser.parse_args(argv)
    args.models = split_choices(parser, "--models", args.models, list(SHAPES))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = begin(args.threads)
    parts = [METHOD.strip()]
    for name in args.models:
        base = SHAPES[name]
        shape = Shape(base.model, batch=args.batch, seq=min(base.model.n_positions, base.seq), steps=args.steps)
        timings = measure(shape, steps=args.steps, warmup=args.warmup, repeats=args.repeats, seed=args.seed)
        parts.append(report(name, shape, timings, args.steps))
        print(parts[-1], "\n", flush=True)
    publish(SECTION, "\n\n".join(parts), env, args.write)


if __name__ == "__main__":
    main()

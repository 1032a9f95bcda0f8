"""Benchmark zero-shot PubMedQA evaluation: our GPT vs the same export run through `transformers`.

What is measured is in `METHOD`, which also heads the section this writes to `docs/benchmarks.md`.
Usage: `python bench/evaluate.py [--hf-dir runs/tiny-static_75/hf] [--questions 200] [--write]`; see `--help`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import REPO, Timing, add_common_arguments, begin, markdown_table, publish, time_interleaved
from transformers import AutoModelForCausalLM

from modelzoo.config import load_config, to_object
from modelzoo.downstream.evaluate import LoadedModel, PubMedQAResult, evaluate_pubmedqa, hf_logits, load_model
from modelzoo.downstream.pubmedqa import PubMedQAExample, load_pubmedqa

METHOD = """\
`modelzoo evaluate`'s PubMedQA scoring (`evaluate_pubmedqa`: lm-eval's prompt, three choices per question
scored by log-likelihood, left-truncated to the model's window, requests with equal inputs sharing one
forward pass, right-padded batches) of `questions` test questions (evenly spaced through the test file,
which is sorted by label), fp32 on CPU, for two loadings of one Hugging Face export:
- ours: `load_model`, i.e. the export imported into our `GPT` (masks from `sparsity.json`, backend
  `masked_dense`), what `modelzoo evaluate task.hf_dirs=[...]` runs;
- transformers: `AutoModelForCausalLM.from_pretrained` on the same directory (`GPT2LMHeadModel`, default
  attention, the attention mask passed), scored by the same function.
examples/s = questions / median seconds of one full pass (tokenisation included); the variants alternate
in interleaved rounds after one warm-up pass each.
"""
SECTION = "PubMedQA evaluation: ours vs transformers (bench/evaluate.py)"
DEFAULT_HF_DIR = REPO / "runs" / "tiny-static_75" / "hf"


def load_variants(hf_dir: Path) -> dict[str, LoadedModel]:
    """The two loadings of `METHOD`, by name."""
    cfg = to_object(load_config(["task=evaluate", "task.device=cpu", "backend=masked_dense"]))
    ours = load_model(str(hf_dir), cfg, "task.hf_dirs")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    theirs = LoadedModel(**{**vars(ours), "kind": "transformers", "logits_fn": hf_logits(hf)})
    return {"ours": ours, "transformers": theirs}


def measure(
    variants: dict[str, LoadedModel], examples: list[PubMedQAExample], batch_size: int, repeats: int
) -> tuple[dict[str, Timing], dict[str, PubMedQAResult]]:
    """Seconds per full pass of each variant (interleaved rounds, one warm-up) and each variant's last result."""
    results: dict[str, PubMedQAResult] = {}

    def one_pass(name: str) -> None:
        results[name] = evaluate_pubmedqa(variants[name], examples, "test", batch_size, progress=False)

    timings = time_interleaved({name: lambda n=name: one_pass(n) for name in variants}, warmup=1, repeats=repeats)
    return timings, results


def report(
    hf_dir: Path, window: int, timings: dict[str, Timing], results: dict[str, PubMedQAResult], args: argparse.Namespace
) -> str:
    """Markdown: examples/s per variant, the ratio, and whether both gave the same answers."""
    ours, theirs = results["ours"], results["transformers"]
    speed = {name: ours.n / t.median for name, t in timings.items()}
    rows = [
        [name, f"{t.median:.2f}", f"{speed[name]:.1f}", f"{speed[name] / speed['transformers']:.2f}x"]
        for name, t in timings.items()
    ]
    same = sum(a["predicted"] == b["predicted"] for a, b in zip(ours.questions, theirs.questions, strict=True))
    diff = max(
        abs(a["scores"][c] - b["scores"][c])
        for a, b in zip(ours.questions, theirs.questions, strict=True)
        for c in a["scores"]
    )
    spread = max(max(t.samples) / min(t.samples) - 1 for t in timings.values())
    shown = hf_dir.relative_to(REPO) if hf_dir.is_relative_to(REPO) else hf_dir
    return "\n".join(
        [
            f"### `{shown}` ({ours.parameters:,} parameters, window {window}); {ours.n} questions, "
            f"batch {args.batch_size}, {args.repeats} interleaved rounds",
            "",
            markdown_table(["variant", "s per pass (median)", "examples/s", "vs transformers"], rows),
            "",
            f"- ours vs transformers: **{speed['ours'] / speed['transformers']:.2f}x** examples/s",
            f"- same prediction on {same}/{ours.n} questions; largest log-likelihood difference {diff:.1e}; "
            f"accuracy {ours.accuracy:.1%} (majority-class baseline {ours.baseline_accuracy:.1%})",
            f"- largest spread of one variant's samples (max/min - 1): {spread:.1%}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hf-dir", type=Path, default=DEFAULT_HF_DIR, help="a GPT-2 export (default: `modelzoo pretrain`'s)"
    )
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pubmedqa", help="PubMedQA dir")
    parser.add_argument("--questions", type=int, default=200, help="N test questions, evenly spaced (default: 200)")
    parser.add_argument("--batch-size", type=int, default=8, help="forward passes per batch (default: 8)")
    add_common_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    if not (args.hf_dir / "config.json").is_file():
        parser.error(f"--hf-dir: {args.hf_dir} has no config.json; run `modelzoo pretrain` or give an export")
    if min(args.questions, args.batch_size, args.repeats) < 1:
        parser.error("--questions, --batch-size and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = begin(args.threads)
    examples = load_pubmedqa(args.data, "test")
    examples = examples[:: max(1, len(examples) // args.questions)][: args.questions]  # the file is sorted by label
    variants = load_variants(args.hf_dir)
    timings, results = measure(variants, examples, args.batch_size, args.repeats)
    window = variants["ours"].max_length
    text = f"{METHOD.strip()}\n\n{report(args.hf_dir.resolve(), window, timings, results, args)}"
    print(text)
    publish(SECTION, text, env, args.write)


if __name__ == "__main__":
    main()

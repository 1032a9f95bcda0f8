"""One-shot pruning of a dense run, then sparse continued pre-training: validation perplexity in `docs/pruning.md`.

    python scripts/pruning_report.py runs/tiny-dense-1200/checkpoints/step_001200 --steps 200 --write
    python scripts/pruning_report.py runs/llama_tiny-dense-300/checkpoints/step_000300 --steps 40 --warmup 4 \
        --val-blocks 128 --seeds 1 2 3 --distill --work runs/pruning-llama-300 --write

1. Restores the dense checkpoint (verified) with its config, tokenizer and corpus, and draws the calibration
   blocks from the corpus's training split, as `modelzoo prune` does. The model family (GPT-2, Llama) is the
   checkpoint's; the pruned matrices are the default `param_filter`'s.
2. Measures validation perplexity (all held-out blocks, or the first `--val-blocks`) of the dense model, then of a
   copy pruned by each method (SparseGPT, Wanda, magnitude) at each target (50% and 70% unstructured, 2:4), all in
   this one process on the same blocks.
3. Continues pre-training the SparseGPT models of the `--recover` targets (50% and 70%) sparse, as a user would:
   the pruned Hugging Face directory as `task.init_from`, `sparsity.init_method=from_weights` (masks = the pruned
   model's nonzeros, held by the static algorithm), the dense run's model, data and optimizer config otherwise,
   `--steps` steps at `--lr`; with `--distill` each also once distilled from the dense model
   (`task.distill.teacher`, SquareHead defaults) on the same steps. A dense control continues the unpruned model
   with the same schedule, so the recovery is not mistaken for what the extra tokens alone give. With `--seeds`
   every continued run (control included) is repeated per training seed; the page shows mean ± sample std, each
   seed's gap taken against the control of the same seed.

The measurements go to `<work>/results.json`, rewritten after every continued run.
`--render A/results.json B/results.json` rewrites the document's parts of the families these results belong to, one
section per dense model, and keeps the parts of the other families (each part sits between marker comments).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modelzoo.config import Config
from modelzoo.config.prune import PruneConfig
from modelzoo.config.train import DistillConfig, TrainConfig
from modelzoo.data.corpus import load_corpus
from modelzoo.data.loader import iter_eval
from modelzoo.export.hf import export_hf
from modelzoo.prune.calibration import calibration_tokens
from modelzoo.prune.hessian import InputStats
from modelzoo.prune.io import save_pruned
from modelzoo.prune.layers import select_layers
from modelzoo.prune.sequential import prune_model
from modelzoo.restore import Restored, restore_model
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.validate import validate

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "pruning.md"
METHODS = ("sparsegpt", "wanda", "magnitude")
TARGETS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"n_m": [2, 4]}}
RECOVER = ("50%", "70%")  # SparseGPT models continued sparse by default
GPT_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # what results saved before "layers" pruned
FAMILY_NAMES = {"gpt": "GPT-2 family", "llama": "Llama family"}  # the order of the parts of the page
POOLED_KEYS = ("family", "samples", "steps", "lr", "warmup", "validation_blocks")  # equal in results pooled
VARIANT_LABELS = {"lm": "", "distill": ", distilled"}  # continued with the LM loss alone, or distilled


@torch.no_grad()
def perplexity(model: nn.Module, blocks: np.ndarray, batch_size: int = 32) -> float:
    """exp of the mean next-token loss over every target of the validation blocks (the trainer's evaluation)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in iter_eval(blocks, batch_size):
        _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    return math.exp(total / count)


@torch.no_grad()
def feature_norm_spread(model: nn.Module, tokens: torch.Tensor) -> float:
    """The largest ratio, over the pruned matrices, of the largest input-feature norm ||X_j||₂ to the median one."""
    layers = [layer for block in select_layers(model, None) for layer in block]
    stats = {layer.name: InputStats(layer.in_features) for layer in layers}
    hooks = [layer.module.register_forward_hook(lambda m, a, o, s=stats[layer.name]: s.add(a[0])) for layer in layers]
    for batch in tokens.split(32):
        model(batch)
    for hook in hooks:
        hook.remove()
    return max(float(s.input_norms().max() / s.input_norms().median()) for s in stats.values())


def continue_pretraining(
    cfg: Config,
    init_from: Path,
    run_dir: Path,
    level: float | None,
    seed: int,
    teacher: Path | None,
    args: argparse.Namespace,
) -> dict:
    """Pre-train on from an HF directory: sparse with masks from its nonzeros when `level` is given, else dense;
    distilled from `teacher` (SquareHead defaults) when one is given. Returns the run's seed, perplexity, sparsity
    and training seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)
    sparsity = SparsityConfig() if level is None else SparsityConfig(sparsity=level, init_method="from_weights")
    task = replace(
        TrainConfig(**cfg.task),  # a restored config holds the task node as a plain dict
        max_steps=args.steps,
        init_from=str(init_from),
        resume=False,
        export=False,
        eval_every=args.steps,
        checkpoint_every=args.steps,
        log_every=max(args.steps // 10, 1),
        eval_batches=None if args.val_blocks is None else args.val_blocks // cfg.task["micro_batch_size"],
        distill=DistillConfig(teacher=None if teacher is None else str(teacher)),
    )
    optim = replace(cfg.optim, lr=args.lr, warmup_steps=args.warmup)
    config = replace(cfg, sparsity=sparsity, task=task, optim=optim, run_dir=str(run_dir), seed=seed)
    validate(config)
    summary = Pretraining(config).fit()
    return {"seed": seed, "ppl": summary.val_ppl, "sparsity": summary.sparsity, "seconds": summary.seconds}


def measure(args: argparse.Namespace) -> dict:
    """Every number of the document, as plain data."""
    run = restore_model(args.checkpoint)
    micro = run.config.task["micro_batch_size"]
    if args.val_blocks is not None and args.val_blocks % micro:
        raise SystemExit(f"--val-blocks {args.val_blocks}: not a multiple of task.micro_batch_size={micro}")
    if args.one_shot_from:
        r, source = reused_one_shot(args), args.one_shot_from.parent
        saved = {t: source / sparsegpt_config(t, args.samples).tag for t in args.recover}
        dense_dir = source / "dense"
    else:
        r, saved, dense_dir = one_shot(args, run)
    cfg = run.config
    variants = {"lm": None, **({"distill": dense_dir} if args.distill else {})}
    r.update(
        command=command(args),
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        recovered={target: {variant: [] for variant in variants} for target in saved},
        control=[],
        results_file=str(args.work / "results.json"),
    )
    # the file is written after the one-shot part and rewritten after every run (control first, then each target plain
    # and distilled, seed by seed), so an interrupted measurement leaves a file that renders the runs done so far
    save(r)
    for seed in args.seeds or [cfg.seed]:
        r["control"].append(
            continue_pretraining(cfg, dense_dir, args.work / f"continued-dense-{seed}", None, seed, None, args)
        )
        save(r)
        for target, path in saved.items():
            for variant, teacher in variants.items():
                run_dir = args.work / f"continued-{path.name}-{variant}-{seed}"
                done = continue_pretraining(cfg, path, run_dir, config_level(target), seed, teacher, args)
                r["recovered"][target][variant].append(done)
                print(f"{target} {variant} seed {seed}: ppl {done['ppl']:.2f}", flush=True)
                save(r)
    return r


def one_shot(args: argparse.Namespace, run: Restored) -> tuple[dict, dict[str, Path], Path]:
    """The one-shot measurements, the SparseGPT models of the `--recover` targets saved as HF directories, and the
    dense model exported as one (the control's start and the teacher)."""
    dense_model, cfg, tokenizer = run.model, run.config, run.tokenizer
    corpus = load_corpus(cfg.data, tokenizer)
    tokens = calibration_tokens(corpus.train, args.samples, cfg.seed, ", ".join(cfg.data.train_files))
    validation = corpus.validation[: args.val_blocks]  # the first blocks: those the trainer's eval_batches take
    dense = perplexity(dense_model, validation)
    spread = feature_norm_spread(dense_model, tokens)
    print(f"dense: ppl {dense:.2f}; input-feature norm max/median up to {spread:.1f}", flush=True)
    pruned: dict[str, dict[str, dict]] = {target: {} for target in TARGETS}
    saved: dict[str, Path] = {}
    for target, kwargs in TARGETS.items():
        for method in METHODS:
            model = copy.deepcopy(dense_model)
            config = PruneConfig(method=method, calibration_samples=args.samples, **kwargs)
            start = time.perf_counter()
            result = prune_model(model, tokens, config)
            cell = {
                "ppl": perplexity(model, validation),
                "error": sum(layer.error for layer in result.layers) / len(result.layers),
                "seconds": time.perf_counter() - start,
                "sparsity": result.sparsity,
            }
            pruned[target][method] = cell
            print(f"{target} {method}: ppl {cell['ppl']:.2f}, error {cell['error']:.4f}", flush=True)
            if method == "sparsegpt" and target in args.recover:
                saved[target] = save_pruned(model, args.work / config.tag, tokenizer, result.masks, config.summary())
    dense_dir = export_hf(dense_model, args.work / "dense", tokenizer)
    m = cfg.model
    r = {
        "checkpoint": str(args.checkpoint),
        "model": f"{m.name} ({m.n_layer} layers, d_model {m.n_embd}, ffn {m.n_inner}, vocab {m.vocab_size})",
        "family": m.family,
        "layers": [
            layer.name.split(".", 3)[3].removesuffix(".weight") for layer in select_layers(dense_model, None)[0]
        ],
        "blocks": m.n_layer,
        "dense_command": f"modelzoo pretrain model={m.name} sparsity=dense task.max_steps={cfg.task['max_steps']} "
        f"run_dir={cfg.run_dir}",
        "dense_steps": cfg.task["max_steps"],
        "batch": cfg.task["batch_size"],
        "seq_len": cfg.data.seq_len,
        "seed": cfg.seed,
        "samples": args.samples,
        "validation_blocks": len(validation),
        "validation_total": len(corpus.validation),
        "dense": dense,
        "feature_norm_spread": spread,
        "pruned": pruned,
    }
    return r, saved, dense_dir


def reused_one_shot(args: argparse.Namespace) -> dict:
    """The one-shot measurements of an earlier `results.json` whose work directory holds its pruned models."""
    r = normalized(json.loads(args.one_shot_from.read_text()))
    blocks = r["validation_total"] if args.val_blocks is None else args.val_blocks
    for key, ours in (("checkpoint", str(args.checkpoint)), ("samples", args.samples), ("validation_blocks", blocks)):
        if r[key] != ours:
            raise SystemExit(f"--one-shot-from {args.one_shot_from}: its {key} is {r[key]}, not {ours}")
    return r


def save(r: dict) -> None:
    """Write `r` to its results file."""
    Path(r["results_file"]).write_text(json.dumps(r, indent=2) + "\n")


def command(args: argparse.Namespace) -> str:
    """The command line that measured `args` (the defaults of the options added since the first pages left out)."""
    text = (
        f"python scripts/pruning_report.py {args.checkpoint} --samples {args.samples} --steps {args.steps} "
        f"--lr {args.lr} --warmup {args.warmup} --work {args.work}"
    )
    if args.recover != list(RECOVER):
        text += " --recover " + " ".join(args.recover)
    if args.val_blocks is not None:
        text += f" --val-blocks {args.val_blocks}"
    if args.one_shot_from:
        text += f" --one-shot-from {args.one_shot_from}"
    if args.seeds:
        text += " --seeds " + " ".join(map(str, args.seeds))
    return text + (" --distill" if args.distill else "")


def sparsegpt_config(target: str, samples: int) -> PruneConfig:
    """The SparseGPT prune of `target`, whose tag names the directory its model is saved to."""
    return PruneConfig(method="sparsegpt", calibration_samples=samples, **TARGETS[target])


def config_level(target: str) -> float:
    return PruneConfig(**TARGETS[target]).level


def holds(r: dict, target: str) -> bool:
    """Whether the papers' order SparseGPT < Wanda < magnitude holds for `target`."""
    ppl = [r["pruned"][target][m]["ppl"] for m in METHODS]
    return ppl[0] < ppl[1] < ppl[2]


def normalized(r: dict) -> dict:
    """`r` in the current layout: results saved before seeds and distillation hold one run per target and a float
    control; they become one-seed lists, and the family, pruned layers and validation size they predate are filled
    in (the GPT tiny models they measured)."""
    r = {
        "family": "gpt",
        "layers": list(GPT_LAYERS),
        "validation_total": r["validation_blocks"],
        "dense_command": f"modelzoo pretrain sparsity=dense task.max_steps={r['dense_steps']}",
        **r,
    }
    if isinstance(r["control"], float):
        seed = r["seed"]
        r["control"] = [{"seed": seed, "ppl": r["control"]}]
        r["recovered"] = {t: {"lm": [{"seed": seed, **rec}]} for t, rec in r["recovered"].items()}
    return r


def pooled(results: list[dict]) -> list[dict]:
    """One result per dense checkpoint: the continued runs of results measured on the same checkpoint with the same
    settings (seeds or targets run as parallel processes) are pooled; their one-shot perplexities, and the dense
    controls of a seed that both ran, must agree."""
    merged: dict[str, dict] = {}
    for r in results:
        first = merged.setdefault(r["checkpoint"], copy.deepcopy(r))
        if first is r or first["results_file"] == r["results_file"]:
            continue
        for key in POOLED_KEYS:
            if first[key] != r[key]:
                raise ValueError(f"{r['results_file']}: {key} {r[key]} differs from {first['results_file']}'s")
        ours, theirs = one_shot_ppl(first), one_shot_ppl(r)
        if any(not math.isclose(ours[key], ppl, rel_tol=1e-6) for key, ppl in theirs.items()):
            raise ValueError(f"{r['results_file']}: its one-shot perplexities differ from {first['results_file']}'s")
        controls = {run["seed"]: run["ppl"] for run in first["control"]}
        for run in r["control"]:  # a seed in both (other targets continued) ran the same, deterministic control
            if run["seed"] not in controls:
                first["control"].append(run)
            elif not math.isclose(controls[run["seed"]], run["ppl"], rel_tol=1e-6):
                raise ValueError(
                    f"{r['results_file']}: its seed {run['seed']} control differs from {first['results_file']}'s"
                )
        for target, variants in r["recovered"].items():
            ours = first["recovered"].setdefault(target, {})
            for variant, runs in variants.items():
                if {run["seed"] for run in ours.get(variant, [])} & {run["seed"] for run in runs}:
                    raise ValueError(
                        f"{r['results_file']}: a seed of its {target} runs is also in {first['results_file']}"
                    )
                ours.setdefault(variant, []).extend(runs)
        first["command"] += "\n" + r["command"]
        first["results_file"] += " " + r["results_file"]
    return list(merged.values())


def without_missing_runs(r: dict) -> dict:
    """`r` without the continued variants that an interrupted measurement has no run of yet."""
    recovered = {t: {v: runs for v, runs in variants.items() if runs} for t, variants in r["recovered"].items()}
    return {**r, "recovered": {t: variants for t, variants in recovered.items() if "lm" in variants}}


def one_shot_ppl(r: dict) -> dict[str, float]:
    """The dense model's and every pruned model's validation perplexity, by `target method` ('dense' for dense)."""
    return {
        "dense": r["dense"],
        **{f"{t} {m}": cell["ppl"] for t, row in r["pruned"].items() for m, cell in row.items()},
    }


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for one value)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(values: list[float], spec: str) -> str:
    """One value as `spec` formats it; several as mean ± sample standard deviation."""
    mean, std = mean_std(values)
    return format(mean, spec) if std is None else f"{mean:{spec}} ± {std:{spec.lstrip('+')}}"


def gaps_after(r: dict, target: str, variant: str = "lm") -> list[float]:
    """Per seed: the continued model's perplexity minus the dense control's of the same seed."""
    control = {run["seed"]: run["ppl"] for run in r["control"]}
    return [run["ppl"] - control[run["seed"]] for run in r["recovered"][target][variant]]


def gap_closed(r: dict, target: str, variant: str = "lm") -> list[float]:
    """Per seed: the share of the pruned model's gap to dense that continued training removed, against the control."""
    before = r["pruned"][target]["sparsegpt"]["ppl"] - r["dense"]
    return [1.0 - after / before for after in gaps_after(r, target, variant)]


def ppls(runs: list[dict]) -> list[float]:
    """The validation perplexities of `runs`."""
    return [run["ppl"] for run in runs]


def render(results: list[dict], page: str = "") -> str:
    """`docs/pruning.md` from the results of `measure`: `page` with the part of each family in `results` rewritten,
    one section per dense model, and the parts of the other families kept."""
    results = [without_missing_runs(r) for r in pooled([normalized(r) for r in results])]
    blocks = {}
    for r in results:
        blocks.setdefault(r["family"], []).append(r)
    kept = {family: text for family, text in parts(page).items() if family not in blocks}
    new = {family: "\n".join(family_part(family, rs)) for family, rs in blocks.items()}
    return "\n".join([*header(), *[{**kept, **new}[f] for f in sorted({**kept, **new}, key=family_order)]]) + "\n"


def family_order(family: str) -> int:
    """Where a family's part goes on the page (known families first, in `FAMILY_NAMES` order)."""
    return list(FAMILY_NAMES).index(family) if family in FAMILY_NAMES else len(FAMILY_NAMES)


def markers(family: str) -> tuple[str, str]:
    """The comments that open and close a family's part of the page."""
    return f"<!-- scripts/pruning_report.py: {family} begin -->", f"<!-- scripts/pruning_report.py: {family} end -->"


def parts(page: str) -> dict[str, str]:
    """Each family's part of a rendered page, markers included."""
    found = {}
    for family in re.findall(r"<!-- scripts/pruning_report\.py: (\w+) begin -->", page):
        begin, end = markers(family)
        found[family] = begin + page.split(begin, 1)[1].split(end, 1)[0] + end
    return found


def header() -> list[str]:
    """The page's title and introduction, above the families' parts."""
    return [
        "# One-shot pruning and sparse continued pre-training (the Sparse Llama recipe)",
        "",
        "Dense models we pre-trained ourselves are pruned one-shot (`modelzoo.prune`) by SparseGPT (Frantar & "
        "Alistarh 2023), Wanda (Sun et al. 2023) and magnitude, then the SparseGPT models continue pre-training "
        "sparse with masks taken from their weights (Sparse Llama, arXiv 2405.03594), for the Llama model also "
        "distilled from the dense model. Everything below is measured by `scripts/pruning_report.py` (its docstring "
        "has the procedure; one command per model, below) on CPU in fp32. Each model family's part of this page is "
        "written from its saved measurements by `--render`, which rewrites the parts of the families it is given "
        "and keeps the others.",
        "",
    ]


def family_part(family: str, results: list[dict]) -> list[str]:
    """One family's part of the page, between its markers: setup, one section per dense model, and a summary."""
    first = results[0]
    begin, end = markers(family)
    norms = "RMSNorms" if family == "llama" else "LayerNorms"
    shown = first["validation_blocks"]
    held = "all" if shown == first["validation_total"] else f"the first {shown} of the"
    lines = [
        begin,
        "",
        f"## {FAMILY_NAMES.get(family, family)}",
        "",
        "Written from the saved measurements with",
        "",
        "```bash",
        "python scripts/pruning_report.py --render " + " ".join(r["results_file"] for r in results),
        "```",
        "",
        f"- pruned: the {len(first['layers']) * first['blocks']} block matrices ({', '.join(first['layers'])} of "
        f"every block: the default `param_filter`); embeddings, {norms} and the LM head stay dense. Every method "
        "removes the same number of weights from each matrix",
        f"- calibration: {first['samples']} random training blocks of {first['seq_len']} tokens of the shipped "
        f"PubMed sample (seed {first['seed']}); SparseGPT with column blocks of 128, dampening 0.01 and weight "
        "updates; Wanda compares within each output row, magnitude within each matrix",
        f"- validation: perplexity over {held} {first['validation_total']} blocks "
        f"({shown * first['seq_len']:,} predicted tokens) of the held-out abstracts",
        "",
    ]
    for r in results:
        lines += section(r)
    if len(results) > 1:
        lines += ["### Across the models", "", *summary(results), ""]
    else:
        lines.insert(-1, caveat(first))
    return [*lines, end, ""]


def caveat(r: dict) -> str:
    """The limits of a family measured on one dense model."""
    seeds = len(r["control"])
    repeated = f"{seeds} seeds of the continued runs" if seeds > 1 else "one seed"
    return (
        f"- Caveats: one tiny model pre-trained {r['dense_steps']} steps, {repeated} (the dense run and the one-shot "
        f"pruning are one run each), {r['steps']} recovery steps, a 2,500-abstract corpus. The papers' regime "
        "(billions of parameters, well-trained teachers) is not reproduced here."
    )


def section(r: dict) -> list[str]:
    dense, pruned = r["dense"], r["pruned"]
    tokens = r["steps"] * r["batch"] * r["seq_len"]
    seeds = [run["seed"] for run in r["control"]]
    lines = [
        f"### {r['model']} after {r['dense_steps']} dense steps: perplexity {dense:.2f}",
        "",
        f"`{r['checkpoint']}`, pre-trained with `{r['dense_command']}` ({r['dense_steps']} steps of {r['batch']} x "
        f"{r['seq_len']} tokens); measured on {r['date']} (torch {r['torch']}) with",
        "",
        "```bash",
        r["command"],
        "```",
        "",
        "#### Perplexity after one-shot pruning",
        "",
        f"Dense: **{dense:.2f}**. Each cell: validation perplexity, and in brackets the mean relative reconstruction "
        "error ||WX - W'X||_F / ||WX||_F of the pruned matrices on their calibration inputs.",
        "",
        "| target | SparseGPT | Wanda | magnitude | SparseGPT < Wanda < magnitude |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for target in TARGETS:
        cells = [f"{pruned[target][m]['ppl']:.2f} ({pruned[target][m]['error']:.3f})" for m in METHODS]
        lines.append(f"| {target} | " + " | ".join(cells) + f" | {'yes' if holds(r, target) else '**no**'} |")
    seconds = {m: sum(pruned[t][m]["seconds"] for t in TARGETS) / len(TARGETS) for m in METHODS}
    lines += [
        "",
        "Pruning wall time per model, mean over the three targets (2 shared CPU cores): "
        + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items())
        + ".",
        "",
        "#### Sparse continued pre-training",
        "",
        f"{r['steps']} steps of {r['batch']} x {r['seq_len']} tokens (**{tokens:,} tokens**, "
        f"{r['steps'] / r['dense_steps']:.0%} of the dense run) from the pruned Hugging Face directory, "
        f"`modelzoo pretrain task.init_from=<dir> sparsity.sparsity=<level> sparsity.init_method=from_weights` with "
        f"the dense run's config otherwise, AdamW lr {r['lr']} after {r['warmup']} warm-up steps, cosine decay to "
        "10%. The dense control continues the unpruned model on the same schedule, and the gap after recovery is "
        "measured against it, since the extra tokens alone lower perplexity too. Gap closed = 1 - (gap after) / "
        "(gap before).",
    ]
    if len(seeds) > 1:
        lines[-1] += (
            f" Every continued run is repeated with the training seeds {', '.join(map(str, seeds))} (`seed=`: the "
            "data order), and each seed's gap is measured against the dense control of the same seed; cells give "
            "the mean ± sample standard deviation over the seeds."
        )
    if any("distill" in variants for variants in r["recovered"].values()):
        lines[-1] += (
            " The distilled rows add `task.distill.teacher=<the dense model's Hugging Face directory>` with the "
            "SquareHead defaults (the LM loss, plus the KL of the token distributions at T = 1, weight 1, plus the "
            f"normalised hidden-state MSE, weight {r['blocks']} = n_layer), on the same steps, tokens, seeds and "
            f"schedule; a distilled run's training took {step_cost(r):.2f}x the wall time of the plain run of its "
            "target and seed (mean over the pairs, 2 shared CPU cores)."
        )
    lines += [
        "",
        "| model | sparsity after | ppl before | ppl after | gap to dense before | gap to dense control after "
        "| gap closed | recovery tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target, variants in r["recovered"].items():
        before = pruned[target]["sparsegpt"]["ppl"]
        for variant, runs in variants.items():
            level = sum(run["sparsity"] for run in runs) / len(runs)
            label = f"SparseGPT {target}{VARIANT_LABELS[variant]}"
            lines.append(
                f"| {label} | {level:.1%} | {before:.2f} | {fmt(ppls(runs), '.2f')} "
                f"| {before - dense:+.2f} | {fmt(gaps_after(r, target, variant), '+.2f')} "
                f"| {fmt(gap_closed(r, target, variant), '.0%')} | {tokens:,} |"
            )
    lines.append(f"| dense control | dense | {dense:.2f} | {fmt(ppls(r['control']), '.2f')} | - | - | - | {tokens:,} |")
    return [*lines, "", "#### Reading the numbers", "", *findings(r), ""]


def step_cost(r: dict) -> float:
    """Training wall time of a distilled run over that of the plain run of the same target and seed, averaged (the
    pair ran back to back in one process, so under similar load)."""
    ratios = []
    for variants in r["recovered"].values():
        plain = {run["seed"]: run["seconds"] for run in variants["lm"]}
        ratios += [run["seconds"] / plain[run["seed"]] for run in variants.get("distill", [])]
    return mean_std(ratios)[0]


def findings(r: dict) -> list[str]:
    dense, pruned = r["dense"], r["pruned"]

    def loss(target: str, method: str) -> str:
        return f"+{pruned[target][method]['ppl'] / dense - 1:.1%}"

    best = all(pruned[t]["sparsegpt"]["ppl"] < min(pruned[t][m]["ppl"] for m in METHODS[1:]) for t in TARGETS)
    ratios = [pruned[t]["sparsegpt"]["error"] / min(pruned[t][m]["error"] for m in METHODS[1:]) for t in TARGETS]
    failed = [t for t in TARGETS if not holds(r, t)]
    order = (
        "The papers' order SparseGPT < Wanda < magnitude holds at every target."
        if not failed
        else "The papers' full order SparseGPT < Wanda < magnitude holds at "
        + (", ".join(t for t in TARGETS if holds(r, t)) or "no target")
        + " but **not at "
        + ", ".join(failed)
        + "** ("
        + "; ".join(
            f"{t}: Wanda {pruned[t]['wanda']['ppl']:.2f}, magnitude {pruned[t]['magnitude']['ppl']:.2f}" for t in failed
        )
        + ")."
    )
    kept = all(
        abs(run["sparsity"] - config_level(t)) < 1e-3
        for t, variants in r["recovered"].items()
        for runs in variants.values()
        for run in runs
    )
    lines = [
        f"- SparseGPT is {'the best method at every target' if best else 'not the best method at every target'}: "
        + "; ".join(
            f"{t}: {loss(t, 'sparsegpt')} perplexity over dense vs {loss(t, 'wanda')} (Wanda) and "
            f"{loss(t, 'magnitude')} (magnitude)"
            for t in TARGETS
        )
        + f". Its OBS weight updates bring the mean reconstruction error to {min(ratios):.0%}-{max(ratios):.0%} of "
        f"the better of the other two methods'. {order}",
        f"- Continued sparse pre-training {'keeps' if kept else '**does not keep**'} the pruned level (masks from the "
        f"weights, held by the static algorithm) and, against the dense control, closes "
        + " and ".join(f"{fmt(gap_closed(r, t), '.0%')} of the SparseGPT {t} model's gap" for t in r["recovered"])
        + " ("
        + "; ".join(
            f"{t}: {pruned[t]['sparsegpt']['ppl']:.2f} -> {fmt(ppls(v['lm']), '.2f')}"
            for t, v in r["recovered"].items()
        )
        + f"; dense {dense:.2f} -> {fmt(ppls(r['control']), '.2f')})."
        + noise(r),
    ]
    if any("distill" in variants for variants in r["recovered"].values()):
        lines.append(distillation(r))
    return lines


def noise(r: dict) -> str:
    """A warning where a one-shot gap is within twice the seed-to-seed standard deviation of the gap after."""
    spread = {t: mean_std(gaps_after(r, t))[1] for t in r["recovered"]}
    dense = r["dense"]
    small = [t for t, std in spread.items() if std and r["pruned"][t]["sparsegpt"]["ppl"] - dense < 2 * std]
    if not small:
        return ""
    return (
        " **Within the noise** at "
        + ", ".join(small)
        + ": the one-shot gap ("
        + ", ".join(f"{r['pruned'][t]['sparsegpt']['ppl'] - dense:+.2f}" for t in small)
        + ") is below twice the seed-to-seed standard deviation of the gap after ("
        + ", ".join(f"{spread[t]:.2f}" for t in small)
        + "), so its share closed says little."
    )


def distillation(r: dict) -> str:
    """What distilling from the dense model changed, per target, seed by seed at equal tokens."""
    effects = []
    lower = {}
    distilled = {t: variants for t, variants in r["recovered"].items() if "distill" in variants}
    for target, variants in distilled.items():
        plain = {run["seed"]: run["ppl"] for run in variants["lm"]}
        diffs = [run["ppl"] - plain[run["seed"]] for run in variants["distill"]]
        lower[target] = sum(d < 0 for d in diffs)
        effects.append(
            f"{target}: {fmt(ppls(variants['distill']), '.2f')} distilled vs {fmt(ppls(variants['lm']), '.2f')} "
            f"without (difference {fmt(diffs, '+.2f')}, lower in {lower[target]} of {len(diffs)} seeds; gap closed "
            f"{fmt(gap_closed(r, target, 'distill'), '.0%')} vs {fmt(gap_closed(r, target), '.0%')})"
        )
    counts = {len(v["distill"]) for v in distilled.values()}
    if all(lower[t] == len(distilled[t]["distill"]) for t in lower):
        verdict = "Distillation from the dense model helps at every target, in every seed"
    elif not any(lower.values()):
        verdict = (
            "Distillation from the dense model **does not help** at this scale: it ends higher at every target, in "
            "every seed"
        )
    else:
        verdict = "Distillation from the dense model has **no consistent effect** at this scale"
    below = [t for t in distilled if mean_std(gaps_after(r, t, "distill"))[0] < 0]
    if below:
        effects[-1] += (
            ". The distilled "
            + ", ".join(below)
            + (" model ends" if len(below) == 1 else " models end")
            + " below the dense control ("
            + ", ".join(fmt(gaps_after(r, t, "distill"), "+.2f") for t in below)
            + f"), which moved {r['dense']:.2f} -> {fmt(ppls(r['control']), '.2f')} on the same tokens: the teacher's "
            "terms hold the student at the dense model's predictions where these extra tokens alone do little"
        )
    return f"- {verdict} (equal tokens, {max(counts)} seeds): " + "; ".join(effects) + "."


def summary(results: list[dict]) -> list[str]:
    """What holds across the dense models, and why Wanda vs magnitude may not."""
    rows = [
        f"| {r['dense_steps']} | {r['dense']:.2f} | {r['feature_norm_spread']:.1f}x | "
        + " | ".join("yes" if holds(r, t) else "no" for t in TARGETS)
        + " | "
        + ", ".join(fmt(gap_closed(r, t), ".0%") for t in r["recovered"])
        + " |"
        for r in results
    ]
    recover = " / ".join(results[0]["recovered"])
    return [
        "| dense steps | dense ppl | largest input-feature norm / median | "
        + " | ".join(f"order at {t}" for t in TARGETS)
        + f" | gap closed, SparseGPT {recover} |",
        "| ---: | ---: | ---: | " + " | ".join("---" for _ in TARGETS) + " | ---: |",
        *rows,
        "",
        "- SparseGPT beats Wanda and magnitude pruning at every target on every model, and sparse continued "
        "pre-training from its output, with masks from the weights, closes part of the gap to a dense model "
        "trained on the same tokens (last column): the Sparse Llama recipe works end to end on our stack."
        if all(
            r["pruned"][t]["sparsegpt"]["ppl"] < min(r["pruned"][t][m]["ppl"] for m in METHODS[1:])
            for r in results
            for t in TARGETS
        )
        else "- SparseGPT does not beat the other methods everywhere; see the tables.",
        wanda_vs_magnitude(results),
        "- Caveats: tiny models, one seed each, a 2,500-abstract corpus. The papers' regime (billions of "
        "parameters, where magnitude pruning collapses) is not reproduced here; the same code prunes Hugging Face "
        "GPT-2 and Llama-family directories (`modelzoo prune task.hf_dir=...`).",
    ]


def wanda_vs_magnitude(results: list[dict]) -> str:
    if all(holds(r, t) for r in results for t in TARGETS):
        return "- Wanda beats magnitude pruning at every target on every model, as in the papers."
    text = (
        "- Wanda vs magnitude does not follow the papers' order everywhere at this scale. Wanda's advantage in its "
        "paper comes from the few input features with very large activations that LLMs develop at scale (Dettmers "
        "et al. 2022); in these models the largest input-feature norm of any pruned matrix is only a few times the "
        "median one, so |W| x ||X|| ranks weights much like |W|, and Wanda's equal budget per output row is then a "
        "constraint that layer-wise magnitude pruning does not have."
    )
    if all(r["pruned"]["2:4"]["wanda"]["ppl"] < r["pruned"]["2:4"]["magnitude"]["ppl"] for r in results):
        text += (
            " Wanda does beat magnitude at 2:4 on every model, where both are confined to the same groups of 4 inputs."
        )
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", help="a dense run's checkpoint directory")
    parser.add_argument("--samples", type=int, default=128, help="calibration blocks (default: 128)")
    parser.add_argument("--steps", type=int, default=200, help="continued pre-training steps (default: 200)")
    parser.add_argument("--lr", type=float, default=5e-4, help="continued pre-training peak lr (default: 5e-4)")
    parser.add_argument("--warmup", type=int, default=20, help="continued pre-training warm-up steps (default: 20)")
    parser.add_argument(
        "--recover", nargs="+", choices=list(TARGETS), default=list(RECOVER), help="SparseGPT targets continued"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="continued pre-training seeds (default: the run's seed)")
    parser.add_argument(
        "--distill", action="store_true", help="also continue each pruned model distilled from the dense one"
    )
    parser.add_argument(
        "--val-blocks",
        type=int,
        help="validate on the first N held-out blocks, a multiple of the micro-batch (default: all)",
    )
    parser.add_argument(
        "--one-shot-from", type=Path, help="reuse this results.json's one-shot measurements and pruned models"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/pruning"), help="pruned models, runs, results")
    parser.add_argument("--render", type=Path, nargs="+", help="only rewrite the document from results.json files")
    parser.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.render is None:
        parser.error("give a checkpoint to measure, or --render results.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        results = [json.loads(path.read_text()) for path in args.render]
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        results = [measure(args)]
    text = render(results, DOC.read_text() if DOC.exists() else "")
    print(text)
    if args.write or args.render:
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()

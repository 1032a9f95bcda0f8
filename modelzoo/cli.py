"""`modelzoo <command> [hydra overrides]`: thin entry points that parse the config and call the library."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from modelzoo.config import ExportConfig, load_config, register_configs, to_object
from modelzoo.data.config import with_detected_format
from modelzoo.errors import ModelZooError
from modelzoo.validate import validate

USAGE = """usage: modelzoo <command> [hydra overrides]

commands:
  pretrain   pre-train a GPT and export it to Hugging Face
             (default: tiny model, 75% static sparsity, the embedded PubMed sample)
  prepare-data [--dry-run] [--cerebras-hdf5=DIR]
             tokenise the data corpus in data.num_workers processes into memory-mapped shards (the cache
             pretrain reads); --dry-run estimates the size; --cerebras-hdf5 also writes Cerebras GPT HDF5 shards
  export     export a run's checkpoint to a Hugging Face directory
  generate   continue a prompt with a run's model (greedy or sampled, KV cache), print tokens/s
  finetune   fine-tune a pre-trained run on PubMedQA or HoC, densely (masks dropped) or keeping its sparsity
  prompt_tune  soft prompting of a frozen pre-trained run (PEFT prompt-tuning adapter)
  prune      one-shot pruning (SparseGPT, Wanda, magnitude) of a run or an HF directory to a sparse HF directory
  evaluate   zero-shot PubMedQA accuracy / macro-F1 of checkpoints and HF directories: table, JSON, plot
  info       parameter counts of a model size and the memory a DDP replica needs to train it
  flops      dense and sparse-effective training FLOPs of a config
  import-cerebras PARAMS.yaml OUT_DIR [CHECKPOINT]
             a Cerebras Model Zoo GPT params file as our config options (OUT_DIR/conf), and its checkpoint
             (torch.save or safetensors, *_mask buffers or NaN-pruned weights) as run OUT_DIR's step 0
  export-cerebras
             a run's checkpoint as a Cerebras Model Zoo params.yaml and model.mdl (task.output_dir)

examples:
  modelzoo pretrain
  modelzoo pretrain model=med sparsity=static_50 data=pubmed_abstracts task.max_steps=5000
  modelzoo pretrain sparsity=dense task.precision=bf16 task.device=cuda
  modelzoo pretrain run_dir=runs/tiny-static_75 task.resume=true
  modelzoo pretrain backend=cerebras cluster=cs2 cluster.mode=compile_only   (cerebras.pytorch venv: lower for a CS-2)
  modelzoo prepare-data data=pubmed_abstracts data.num_workers=2 --dry-run
  modelzoo export run_dir=runs/tiny-static_75 task.output_dir=exported/
  modelzoo generate run_dir=runs/tiny-static_75 'task.prompt="The patient"' backend=torch_sparse
  modelzoo generate task.hf_dir=exported/ task.prompt=Aspirin task.temperature=0.8 task.top_p=0.95 seed=7
  modelzoo finetune task.pretrained=runs/tiny-static_75 task.sparsity=dense task.dataset=pubmedqa
  modelzoo prompt_tune task.pretrained=runs/tiny-static_75 task.dataset=hoc task.num_virtual_tokens=20
  modelzoo prune run_dir=runs/tiny-dense task.method=sparsegpt task.sparsity=0.5
  modelzoo prune task.hf_dir=DIR task.method=wanda task.n_m=[2,4] task.output_dir=pruned/
  modelzoo evaluate task.checkpoints=[runs/tiny-dense,runs/tiny-static_75] task.hf_dirs=[exported/]
  modelzoo info model=xl task.micro_batch_size=8 data.seq_len=2048 task.precision=bf16
  modelzoo flops model=xl sparsity=static_75
  modelzoo import-cerebras params_gpt3_xl.yaml imported/ model.mdl
  modelzoo export-cerebras run_dir=runs/tiny-static_75 task.output_dir=cerebras/
  modelzoo pretrain --cfg job        (print the composed config; any Hydra flag works after pretrain)

config groups (conf/): model={tiny,med,large,xl}
  sparsity={dense,static_50,static_75,gmp_75,set_75,rigl_75,nm_2_4,cerebras_gpt3_125m_rigl75}
  backend={auto,masked_dense,torch_sparse,cerebras} cluster={local,cs2}
  data={pubmed_sample,pubmed_abstracts,hub} tokenizer={bpe,gpt2} optim={adamw}
  task={pretrain,export,generate,prune,evaluate,finetune,prompt_tune}
"""

log = logging.getLogger("modelzoo")


def _fail(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def pretrain(overrides: list[str]) -> None:
    """Run as a Hydra application: the run directory gets `.hydra/` (composed config) and a log file.

    Plain overrides are validated (and the run directory checked) before Hydra creates anything; with
    Hydra flags (`--cfg`, `--multirun`, ...) Hydra composes on its own. Under torchrun only rank 0 writes
    Hydra's files and log.
    """
    from modelzoo import runlock
    from modelzoo.distributed import shutdown
    from modelzoo.train.budget import resolved
    from modelzoo.train.checkpoint import check_run_dir
    from modelzoo.train.trainer import Trainer

    if not any(arg.startswith("-") for arg in overrides):
        config = to_object(load_config(["task=pretrain", *overrides]))
        validate(config)
        config = resolved(config)
        if not int(os.environ.get("RANK", "0")):  # before Hydra writes .hydra/ and the log into the run directory
            runlock.acquire(config.run_dir)
        check_run_dir(config.run_dir, resume=config.task.resume)
    register_configs()

    @hydra.main(config_path="pkg://modelzoo.conf", config_name="config", version_base="1.3")
    def run(cfg: DictConfig) -> None:
        try:
            config = to_object(cfg)
            validate(config)
            Trainer(config).fit()
        except (ModelZooError, OmegaConfBaseException) as e:
            _fail(e)
        finally:
            shutdown()

    quiet = ["hydra.output_subdir=null", "hydra/job_logging=none"] if int(os.environ.get("RANK", "0")) else []
    # Hydra's parser wants its flags (`-m`, `--cfg job`, ...) before one run of overrides.
    plain = [a for a in overrides if "=" in a and not a.startswith("-")]
    flags = [a for a in overrides if a not in plain]
    sys.argv = ["modelzoo pretrain", *flags, "task=pretrain", *with_detected_format(plain), *quiet]
    run()


def prepare_data(args: list[str]) -> None:
    """Prepare the `data` corpus (every source of a mixture) into the cache that `pretrain` reads."""
    from modelzoo.data.prepare_task import run

    flags = [a for a in args if a.startswith("--")]
    unknown = [f for f in flags if f != "--dry-run" and not f.startswith("--cerebras-hdf5=")]
    if unknown:
        raise ModelZooError(
            f"unknown flag {unknown[0]}; usage: modelzoo prepare-data [--dry-run] [--cerebras-hdf5=DIR] [overrides]"
        )
    cfg = to_object(load_config(["task=pretrain", *[a for a in args if not a.startswith("--")]]))
    validate(cfg)
    hdf5 = next((f.split("=", 1)[1] for f in flags if f.startswith("--cerebras-hdf5=")), None)
    print(run(cfg.data, cfg.tokenizer, dry_run="--dry-run" in flags, cerebras_hdf5=hdf5))


def export(overrides: list[str]) -> None:
    from modelzoo.export.hf import export_hf
    from modelzoo.restore import restore_model
    from modelzoo.train.checkpoint import resolve_checkpoint

    cfg = to_object(load_config(["task=export", *overrides]))
    validate(cfg)
    task: ExportConfig = cfg.task
    path = resolve_checkpoint(task.checkpoint, cfg.run_dir)
    run = restore_model(path)
    output = Path(task.output_dir) if task.output_dir else path.parent.parent / "hf"
    info = {**(run.config.sparsity.summary() if run.config.sparsity.enabled else {}), "checkpoint": str(path)}
    print(f"exported {path} -> {export_hf(run.model, output, run.tokenizer, info)}")


def generate(overrides: list[str]) -> None:
    from modelzoo.generate import format_speed, run

    cfg = to_object(load_config(["task=generate", *overrides]))
    validate(cfg)
    text, result = run(cfg)
    print(text)
    print(format_speed(result))


def prune(overrides: list[str]) -> None:
    from modelzoo.prune.task import run

    cfg = to_object(load_config(["task=prune", *overrides]))
    validate(cfg)
    print(run(cfg).format(cfg.task))


def evaluate(overrides: list[str]) -> None:
    from modelzoo.downstream.evaluate import run
    from modelzoo.downstream.results import markdown_table, write_results

    cfg = to_object(load_config(["task=evaluate", *overrides]))
    validate(cfg)
    results = run(cfg)
    print(markdown_table(results))
    for what, path in write_results(results, cfg.task.output_dir).items():
        print(f"{what}: {path}")


def _adapt(task: str, overrides: list[str]) -> None:
    from modelzoo.finetune.task import format_summary, run

    cfg = to_object(load_config([f"task={task}", *overrides]))
    validate(cfg)
    print(format_summary(run(cfg)))


def finetune(overrides: list[str]) -> None:
    _adapt("finetune", overrides)


def prompt_tune(overrides: list[str]) -> None:
    _adapt("prompt_tune", overrides)


def info(overrides: list[str]) -> None:
    from modelzoo.memory import format_memory_plan, memory_plan
    from modelzoo.report import format_model_info
    from modelzoo.train.config import resolved_precision

    cfg = to_object(load_config(overrides))
    validate(cfg)
    print(format_model_info(cfg.model, cfg.sparsity))
    t = cfg.task
    precision = resolved_precision(t.precision, cfg.cluster.target)
    print(format_memory_plan(memory_plan(cfg.model, cfg.sparsity, precision, t.micro_batch_size, cfg.data.seq_len)))


def flops(overrides: list[str]) -> None:
    from modelzoo.flops import flop_report, format_report
    from modelzoo.train.budget import resolved

    cfg = to_object(load_config(overrides))
    validate(cfg)
    cfg = resolved(cfg)
    tokens = cfg.task.max_steps * cfg.task.batch_size * cfg.data.seq_len
    report = flop_report(cfg.model, cfg.data.seq_len, cfg.sparsity, steps=cfg.task.max_steps)
    print(format_report(report, tokens=tokens))


def import_cerebras(args: list[str]) -> None:
    from modelzoo.export.cerebras_checkpoint import import_cerebras as import_checkpoint
    from modelzoo.export.cerebras_params import read_params, write_hydra_options

    if len(args) not in (2, 3) or any("=" in a for a in args):
        raise ModelZooError("usage: modelzoo import-cerebras PARAMS.yaml OUT_DIR [CHECKPOINT]")
    params, out_dir = args[0], Path(args[1])
    overrides = write_hydra_options(read_params(params), out_dir / "conf")
    print(f"wrote the config options of {params} to {out_dir / 'conf'}; train with them:")
    print("  modelzoo pretrain " + " ".join(overrides))
    if len(args) == 3:
        path = import_checkpoint(params, args[2], out_dir)
        print(f"imported {args[2]} -> {path}; then: modelzoo export run_dir={out_dir}")


def export_cerebras(overrides: list[str]) -> None:
    from modelzoo.export.cerebras_checkpoint import export_cerebras as export_checkpoint
    from modelzoo.train.checkpoint import resolve_checkpoint

    cfg = to_object(load_config(["task=export", *overrides]))
    validate(cfg)
    path = resolve_checkpoint(cfg.task.checkpoint, cfg.run_dir)
    output = Path(cfg.task.output_dir) if cfg.task.output_dir else path.parent.parent / "cerebras"
    params, weights = export_checkpoint(path, output)
    print(f"exported {path} -> {params}, {weights}")


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "pretrain": pretrain,
    "prepare-data": prepare_data,
    "export": export,
    "generate": generate,
    "prune": prune,
    "finetune": finetune,
    "prompt_tune": prompt_tune,
    "evaluate": evaluate,
    "info": info,
    "flops": flops,
    "import-cerebras": import_cerebras,
    "export-cerebras": export_cerebras,
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, overrides = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        COMMANDS[command](overrides)
    except (ModelZooError, OmegaConfBaseException, HydraException) as e:
        _fail(e)

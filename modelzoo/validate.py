"""Config validation: every invalid value is refused before any compute, naming the key and what would work.

`validate(cfg)` is the one entry (the CLI calls it for every command); it dispatches on the task node to one
validator per task. Checks shared by tasks (device and precision, the model, the data) are written once here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from modelzoo import checkpoint as ckpt
from modelzoo.backends import backend_class, backends_with, check_supports, resolve_name
from modelzoo.backends.converters import check_converter
from modelzoo.config import Config, ExportConfig, GenerateConfig, load_config, to_object
from modelzoo.config.evaluate import EvaluateConfig
from modelzoo.config.experiment import STAGE_TASKS, ExperimentConfig
from modelzoo.config.finetune import DATASETS, SPARSITY_MODES, FinetuneConfig, PromptTuneConfig, default_data_dir
from modelzoo.config.prune import PruneConfig
from modelzoo.config.prune import validate as validate_prune
from modelzoo.config.train import (
    BUDGETS,
    CS2_PRECISIONS,
    DECAYS,
    DEVICES,
    NONFINITE_POLICIES,
    PARALLELISMS,
    PRECISIONS,
    OptimConfig,
    TrainConfig,
    resolved_device,
    resolved_precision,
)
from modelzoo.data.config import FORMATS, DataConfig, resolve_sources
from modelzoo.distributed import world_size
from modelzoo.downstream.pubmedqa import SPLITS
from modelzoo.errors import ConfigError
from modelzoo.init_from import with_init_from
from modelzoo.models.gpt import ACTIVATIONS, GPTConfig
from modelzoo.models.llama import LlamaConfig
from modelzoo.models.registry import ModelConfig, build_model, config_class
from modelzoo.models.soft_prompt import PROMPT_INITS
from modelzoo.sparsity.plan import check_run, never_updated, plan_groups
from modelzoo.train.accel import validate_accel
from modelzoo.train.budget import trained_steps
from modelzoo.train.distill import check_teacher
from modelzoo.train.parallel import fsdp_problem

log = logging.getLogger(__name__)

EVALUATE_TASKS = ("pubmedqa",)
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # e.g. LlamaForCausalLM, GPT2LMHeadModel


def validated_config(overrides: list[str], task: str | None = None) -> Config:
    """The config of a command: composed from `overrides` (with `task=<task>` first, when given; completed from
    `task.init_from`, `modelzoo.init_from`) and validated."""
    cfg = to_object(load_config(with_init_from([*([f"task={task}"] if task else []), *overrides])))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject every invalid value of `cfg` for its task (`cfg.task`'s type), before any data or model is touched."""
    task = cfg.task
    if isinstance(task, FinetuneConfig):  # the model and its sparsity come from task.pretrained
        validate_finetune(cfg)
        return
    validate_model(cfg.model)
    cfg.sparsity.validate()
    validate_data(cfg.data, cfg.model)
    if isinstance(task, TrainConfig):
        validate_pretrain(cfg)
        validate_experiment(cfg.experiment)
    elif cfg.cluster.mode != "train":
        raise ConfigError("cluster.mode", f"{cfg.cluster.mode} applies to pretrain only", ["train"])
    if isinstance(task, GenerateConfig):
        validate_generate(cfg)
    elif isinstance(task, EvaluateConfig):
        validate_evaluate(cfg)
    elif isinstance(task, PruneConfig):
        validate_prune(task)
        check_device(task.device)
    elif not isinstance(task, (TrainConfig, ExportConfig)):
        raise ConfigError("task", f"no validator for {type(task).__name__}")
    if cfg.sparsity.enabled:
        with torch.device("meta"):
            model = build_model(cfg.model)
        if isinstance(task, TrainConfig):  # every level the run's masks take, up to task.max_steps
            check_run(cfg.sparsity, model, task.max_steps)
        else:
            plan_groups(cfg.sparsity, model)
    if isinstance(task, TrainConfig):  # warnings, not refusals: a short smoke run of a long recipe is legitimate
        steps = trained_steps(cfg)
        warn_long_warmup(cfg.optim, steps)
        for warning in never_updated(cfg.sparsity, steps) if cfg.sparsity.enabled else []:
            log.warning("warning: %s", warning)


def warn_long_warmup(optim: OptimConfig, steps: int) -> None:
    """Log a warning naming the keys when the learning-rate warm-up does not end before the run's `steps`
    optimizer steps do: the peak `optim.lr` is never (or only at the end) reached and the decay never starts."""
    warmup = optim.warmup_steps
    if warmup < steps:
        return
    reached = f"peaks at {steps / warmup:.0%} of optim.lr" if warmup > steps else "reaches optim.lr at the end"
    log.warning(
        "warning: optim.warmup_steps=%d is not below task.max_steps=%d: the learning rate %s and never decays; "
        "set optim.warmup_steps=%d (a tenth of the run) or raise task.max_steps",
        warmup,
        steps,
        reached,
        steps // 10,
    )


# ---- shared --------------------------------------------------------------------------------------------
def check_device(device: str, precision: str | None = None, on_cs2: bool = False) -> str:
    """`task.device` (and `task.precision`) known, and CUDA present when asked for; returns the resolved device.

    cbf16 / fp16 (cstorch's, with loss scaling) only where `on_cs2`: a backend=cerebras cluster=cs2 run."""
    if device not in DEVICES:
        raise ConfigError("task.device", f"unknown {device!r}", DEVICES)
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError("task.precision", f"unknown {precision!r}", PRECISIONS)
    if precision in CS2_PRECISIONS and not on_cs2:
        raise ConfigError(
            "task.precision",
            f"{precision} is cstorch's mixed precision on a CS-2: use backend=cerebras cluster=cs2 for pre-training, "
            "or task.precision=bf16 here",
        )
    resolved = resolved_device(device)
    if resolved == "cuda" and not torch.cuda.is_available():
        raise ConfigError("task.device", "cuda requested but no CUDA device is visible", ["auto", "cpu"])
    return resolved


def check_positive(task: object, keys: tuple[str, ...], prefix: str = "task") -> None:
    for key in keys:
        if getattr(task, key) <= 0:
            raise ConfigError(f"{prefix}.{key}", f"must be positive, got {getattr(task, key)}")


def check_choices(task: object, choices: dict[str, tuple[str, ...]], prefix: str = "task") -> None:
    """Each `<prefix>.<key>` is one of its `choices[key]`."""
    for key, allowed in choices.items():
        if getattr(task, key) not in allowed:
            raise ConfigError(f"{prefix}.{key}", f"unknown {getattr(task, key)!r}", allowed)


def validate_experiment(experiment: ExperimentConfig) -> None:
    """Every downstream stage of an experiment is a valid fine-tuning run, checked before its pre-training."""
    for i, stage in enumerate(experiment.stages):
        prefix = f"experiment.stages[{i}]"
        check_choices(stage, {"task": STAGE_TASKS, "dataset": DATASETS, "sparsity": SPARSITY_MODES}, prefix)
        check_positive(stage, ("max_steps", "eval_every", "batch_size"), prefix)
        if stage.lr is not None and stage.lr <= 0:
            raise ConfigError(f"{prefix}.lr", f"must be positive or null, got {stage.lr}")


def check_batches(batch_size: int, micro_batch_size: int) -> None:
    """The global batch splits into micro-batches on every torchrun rank; the refusal names the largest
    `task.micro_batch_size` below the given one that splits it, where one does (the batch divides by the ranks)."""
    ranks = world_size()
    per_step = micro_batch_size * ranks  # one micro-batch on each torchrun rank
    if batch_size % per_step:
        fits = [m for m in range(micro_batch_size, 0, -1) if batch_size % (m * ranks) == 0]
        times = f" x {ranks} ranks" if ranks > 1 else ""
        fix = (
            f"set task.micro_batch_size={fits[0]}, or" if fits else f"no micro-batch size splits it over {ranks} ranks;"
        )
        raise ConfigError(
            "task.batch_size",
            f"{batch_size} is not divisible by task.micro_batch_size={micro_batch_size}{times}: {fix} set "
            "task.batch_size to one of",
            [n for n in range(per_step, 4 * per_step + 1, per_step)],
        )


def validate_model(m: ModelConfig) -> None:
    if not isinstance(m, config_class(m.family)):
        raise ConfigError(
            "model.family",
            f"{m.family!r} does not match the option's schema {type(m).__name__}; the model option sets it",
        )
    for key in ("n_layer", "n_embd", "n_head", "n_kv_head", "n_inner", "n_positions", "vocab_size"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key}", f"must be positive, got {getattr(m, key)}")
    if m.padded_vocab_multiple <= 0:
        raise ConfigError("model.padded_vocab_multiple", f"must be positive, got {m.padded_vocab_multiple}")
    if m.n_embd % m.n_head:
        raise ConfigError("model.n_head", f"n_embd={m.n_embd} is not divisible by n_head={m.n_head}")
    if m.n_head % m.n_kv_head:
        raise ConfigError("model.n_kv_head", f"n_head={m.n_head} is not divisible by n_kv_head={m.n_kv_head}")
    FAMILY_CHECKS[m.family](m)


def _check_gpt(m: GPTConfig) -> None:
    if m.activation not in ACTIVATIONS:
        raise ConfigError("model.activation", f"unknown {m.activation!r}", sorted(ACTIVATIONS))
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", f"{m.dropout} is outside [0, 1)")


def _check_llama(m: LlamaConfig) -> None:
    if m.head_dim % 2:
        raise ConfigError("model.n_head", f"head_dim={m.head_dim} is odd; rotary embeddings rotate pairs of entries")
    for key in ("rope_theta", "rms_norm_eps"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key}", f"must be positive, got {getattr(m, key)}")
    s = m.rope_scaling
    if s is not None and not (s.factor > 0 and 0 < s.low_freq_factor < s.high_freq_factor):
        raise ConfigError(
            "model.rope_scaling",
            f"needs factor > 0 and 0 < low_freq_factor < high_freq_factor, got {s.factor}, {s.low_freq_factor}, "
            f"{s.high_freq_factor}",
        )


FAMILY_CHECKS = {"gpt": _check_gpt, "llama": _check_llama}


def validate_data(d: DataConfig, m: ModelConfig) -> None:
    if d.seq_len < 2:
        raise ConfigError("data.seq_len", f"must be at least 2, got {d.seq_len}")
    if d.seq_len > m.n_positions:
        raise ConfigError(
            "data.seq_len", f"{d.seq_len} exceeds the model's positions (model.n_positions={m.n_positions})"
        )
    if d.format not in FORMATS:
        raise ConfigError("data.format", f"unknown {d.format!r}", FORMATS)
    for i, source in enumerate(d.sources):
        if source.format not in FORMATS:
            raise ConfigError(f"data.sources[{i}].format", f"unknown {source.format!r}", FORMATS)
    if not d.train_files and not d.hub_name and not d.sources:
        raise ConfigError("data.train_files", "no training data: give data.train_files, data.hub_name or data.sources")
    for source, _ in resolve_sources(d):
        if not 0.0 <= source.validation_fraction < 1.0:
            raise ConfigError("data.validation_fraction", f"{source.validation_fraction} is outside [0, 1)")
    if d.num_workers is not None and d.num_workers < 1:
        raise ConfigError("data.num_workers", f"must be at least 1 (or null: all cores), got {d.num_workers}")
    if d.shard_blocks < 1:
        raise ConfigError("data.shard_blocks", f"must be at least 1, got {d.shard_blocks}")


def validate_optim(o: OptimConfig) -> None:
    if o.decay not in DECAYS:
        raise ConfigError("optim.decay", f"unknown {o.decay!r}", DECAYS)
    if o.lr <= 0:
        raise ConfigError("optim.lr", f"must be positive, got {o.lr}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"{o.min_lr_ratio} is outside [0, 1]")


# ---- pretrain ------------------------------------------------------------------------------------------
def validate_pretrain(cfg: Config) -> None:
    t: TrainConfig = cfg.task
    check_positive(t, ("max_steps", "batch_size", "micro_batch_size", "log_every", "eval_every", "checkpoint_every"))
    check_batches(t.batch_size, t.micro_batch_size)
    if t.keep_checkpoints < 1:
        raise ConfigError("task.keep_checkpoints", f"must be at least 1, got {t.keep_checkpoints}")
    check_choices(t, {"budget": BUDGETS, "on_nonfinite": NONFINITE_POLICIES, "parallelism": PARALLELISMS})
    if t.max_nonfinite_skips < 0:
        raise ConfigError("task.max_nonfinite_skips", f"must be >= 0, got {t.max_nonfinite_skips}")
    backend = resolve_name(cfg.backend.name)
    capabilities = backend_class(backend).capabilities
    on_cs2 = capabilities.clusters and cfg.cluster.target == "CSX"
    precision = resolved_precision(t.precision, cfg.cluster.target)
    device = check_device(t.device, precision, on_cs2=on_cs2)
    validate_optim(cfg.optim)
    if t.on_nonfinite == "skip" and not capabilities.host_skips_updates:
        why = f"skip decides on the host before each update; {backend} runs the update itself"
        raise ConfigError("task.on_nonfinite", why, ["stop"])
    validate_accel(t, cfg.optim, device, capabilities.own_compiler)
    validate_parallelism(t.parallelism, backend)
    validate_cluster(cfg, backend, device)
    if t.distill.enabled:
        if not capabilities.distillation:
            raise ConfigError(
                "task.distill.teacher",
                f"{backend} cannot run a teacher beside the model in its step; distil with",
                backends_with(lambda c: c.distillation),
            )
        check_teacher(cfg.model, t.distill)
    backend_class(backend).check_config(cfg, device)  # before check_supports: it names what cstorch lacks too
    for algorithm in cfg.sparsity.algorithms or [None]:
        check_supports(backend, algorithm=algorithm, device=device, dtype=precision)


def validate_parallelism(parallelism: str, backend: str) -> None:
    """`task.parallelism=fsdp` needs a backend whose model torch's FSDP2 can shard, and a torch that has it."""
    if parallelism != "fsdp":
        return
    if not backend_class(backend).capabilities.fsdp:
        why = f"fsdp shards the model with torch's FSDP2, which {backend} does not train with: use ddp or a backend"
        raise ConfigError("task.parallelism", why, backends_with(lambda c: c.fsdp))
    problem = fsdp_problem()
    if problem:
        raise ConfigError("task.parallelism", f"fsdp: {problem}; use ddp", ["ddp"])


def validate_cluster(cfg: Config, backend: str, device: str) -> None:
    """The `cluster` node, and what the backend's capabilities allow of it and of torchrun; the backend's
    `check_config` checks the rest (a CS-2's needs)."""
    cfg.cluster.validate(device)
    capabilities = backend_class(backend).capabilities
    if world_size() > 1 and not capabilities.torchrun:
        raise ConfigError(
            "backend.name",
            f"{backend} scales out on a cluster of its own (cluster.num_csx), not under torchrun: run one process, "
            "or use",
            backends_with(lambda c: c.torchrun),
        )
    if not capabilities.clusters and cfg.cluster.target != "auto":
        raise ConfigError(
            "cluster.target",
            f"{cfg.cluster.resolved_target(device)} is a cstorch backend: use backend=cerebras, or cluster=local "
            f"with {backend}",
        )
    if not capabilities.clusters and cfg.cluster.mode != "train":
        raise ConfigError(
            "cluster.mode", f"{cfg.cluster.mode} lowers for a CS-2: it needs backend=cerebras cluster=cs2"
        )


# ---- finetune / prompt_tune ----------------------------------------------------------------------------
def validate_finetune(cfg: Config) -> None:
    """Check every key, and the token budget against the pre-trained model's positions, before any compute."""
    task: FinetuneConfig = cfg.task
    check_choices(task, {"dataset": DATASETS, "sparsity": SPARSITY_MODES})
    if task.limit < 0:
        raise ConfigError("task.limit", f"must be >= 0 (0: every example), got {task.limit}")
    check_positive(task, ("max_steps", "batch_size", "micro_batch_size", "eval_batch_size", "eval_every", "log_every"))
    check_batches(task.batch_size, task.micro_batch_size)
    if task.keep_checkpoints < 1:
        raise ConfigError("task.keep_checkpoints", f"must be at least 1, got {task.keep_checkpoints}")
    check_device(task.device, task.precision)
    if cfg.backend.name not in ("auto", "masked_dense"):  # auto: masked_dense here, even where cstorch imports
        raise ConfigError(
            "backend.name",
            f"fine-tuning runs on masked_dense; {cfg.backend.name!r} trains pre-training only",
            ["auto", "masked_dense"],
        )
    validate_optim(cfg.optim)
    warn_long_warmup(cfg.optim, task.max_steps)
    if task.lr is not None and task.lr <= 0:
        raise ConfigError("task.lr", f"must be positive, got {task.lr}")
    data_dir = Path(task.data_dir or default_data_dir(task.dataset))
    if not data_dir.is_dir():
        raise ConfigError("task.data_dir", f"{data_dir} is not a directory (the {task.dataset} files)")
    checkpoint = ckpt.find_checkpoint(task.pretrained, "task.pretrained")
    positions = int(OmegaConf.create(ckpt.read_config(checkpoint)).model.n_positions)
    virtual = task.num_virtual_tokens if isinstance(task, PromptTuneConfig) else 0
    if isinstance(task, PromptTuneConfig):
        if task.init not in PROMPT_INITS:
            raise ConfigError("task.init", f"unknown {task.init!r}", PROMPT_INITS)
        if task.num_virtual_tokens <= 0:
            raise ConfigError("task.num_virtual_tokens", f"must be positive, got {task.num_virtual_tokens}")
        if task.init == "text" and not task.init_text:
            raise ConfigError("task.init_text", "is empty but task.init=text")
    seq_len = task.seq_len if task.seq_len is not None else positions - virtual
    if seq_len < 2 or virtual + seq_len > positions:
        key = "task.num_virtual_tokens" if virtual else "task.seq_len"
        text = f"task.seq_len={seq_len}" if task.seq_len is not None else f"{seq_len} tokens of text"
        raise ConfigError(
            key,
            f"{virtual} virtual tokens + {text} do not fit the model's {positions} positions "
            f"(model.n_positions in {checkpoint}/config.yaml); at least 2 tokens of text must remain",
        )


# ---- generate / evaluate -------------------------------------------------------------------------------
def check_inference(device: str, precision: str, converter: str) -> None:
    """Device and precision, and an inference converter (`task.converter`) that runs there."""
    check_converter(converter, check_device(device, precision), precision)


def validate_generate(cfg: Config) -> None:
    task: GenerateConfig = cfg.task
    if task.checkpoint and task.hf_dir:
        raise ConfigError("task.hf_dir", "give task.checkpoint or task.hf_dir, not both")
    if task.max_new_tokens < 1:
        raise ConfigError("task.max_new_tokens", f"must be at least 1, got {task.max_new_tokens}")
    if task.temperature < 0:
        raise ConfigError("task.temperature", f"must be >= 0 (0 is greedy), got {task.temperature}")
    if task.top_k < 0:
        raise ConfigError("task.top_k", f"must be >= 0 (0 is off), got {task.top_k}")
    if not 0 < task.top_p <= 1:
        raise ConfigError("task.top_p", f"{task.top_p} is outside (0, 1] (1 is off)")
    check_inference(task.device, task.precision, task.converter)


def validate_evaluate(cfg: Config) -> None:
    task: EvaluateConfig = cfg.task
    for name in task.tasks:
        if name not in EVALUATE_TASKS:
            raise ConfigError("task.tasks", f"unknown task {name!r}", EVALUATE_TASKS)
    if task.split not in SPLITS:
        raise ConfigError("task.split", f"unknown split {task.split!r}", SPLITS)
    if task.batch_size < 1:
        raise ConfigError("task.batch_size", f"must be at least 1, got {task.batch_size}")
    if task.limit < 0:
        raise ConfigError("task.limit", f"must be >= 0 (0: every question), got {task.limit}")
    check_inference(task.device, task.precision, task.converter)
    for key, paths in (("task.checkpoints", task.checkpoints), ("task.hf_dirs", task.hf_dirs)):
        for path in paths:
            if not Path(path).is_dir():
                raise ConfigError(key, f"{path} is not a directory")
    for path in task.hf_dirs:
        if not (Path(path) / "config.json").is_file():
            raise ConfigError("task.hf_dirs", f"{path} has no config.json; give a directory written by save_pretrained")
        architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
        if any(not name.endswith(CAUSAL_LM_SUFFIXES) for name in architectures):
            raise ConfigError(
                "task.hf_dirs",
                f"{path} holds a {', '.join(architectures)} (config.json 'architectures'), not a causal LM; "
                "a HoC classifier's test F1 is in the summary.json of its run",
            )

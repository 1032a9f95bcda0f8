"""Hydra structured configs: the library's config dataclasses, registered in the ConfigStore, and validation.

`conf/` holds the YAML options of each group; every node is typed by a dataclass here, so an unknown key
or a wrongly typed value fails while the config is composed. `validate` then checks what types cannot
(ranges, divisibility, a `param_filter` that selects nothing), before any data is read or model built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict

from modelzoo.backends import BACKENDS, check_supports, resolve_name
from modelzoo.cluster import ClusterConfig
from modelzoo.data.config import FORMATS, DataConfig, TokenizerConfig, resolve_sources, with_detected_format
from modelzoo.distributed import world_size
from modelzoo.downstream.config import EvaluateConfig
from modelzoo.errors import ConfigError
from modelzoo.finetune.config import FinetuneConfig, PromptTuneConfig, validate_finetune
from modelzoo.models.gpt import ACTIVATIONS, GPT, GPTConfig
from modelzoo.prune.config import PruneConfig
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plan import plan_groups
from modelzoo.train.config import DECAYS, DEVICES, PRECISIONS, OptimConfig, TrainConfig


@dataclass
class BackendConfig:
    name: str = "auto"


@dataclass
class ExportConfig:
    """Export a checkpoint (default: the latest in `run_dir`) to a Hugging Face directory."""

    name: str = "export"
    checkpoint: str | None = None
    output_dir: str | None = None


@dataclass
class GenerateConfig:
    """Generate text from a checkpoint (default: the latest in `run_dir`) or a Hugging Face directory `hf_dir`.

    `temperature` 0 decodes greedily; above 0 it samples, after `top_k` (0: off) and `top_p` (1.0: off)
    filtering, seeded by the root `seed`. An empty `prompt` starts from the tokenizer's BOS token.
    """

    name: str = "generate"
    checkpoint: str | None = None
    hf_dir: str | None = None
    prompt: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    use_cache: bool = True
    device: str = "auto"
    precision: str = "fp32"


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    task: Any = MISSING  # TrainConfig | ExportConfig | GenerateConfig: typed by the chosen task option
    seed: int = 1234
    run_dir: str = "runs/default"
    # backend=cerebras cluster=cs2 only: lower the model locally, then stop at the remote compile (or validate).
    compile_only: bool = False
    validate_only: bool = False


def _package_data(relative: str) -> str:
    """Absolute path of a file shipped inside the `modelzoo` package (`${pkg_data:samples/...}`)."""
    return str(resources.files("modelzoo").joinpath("data", relative))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="task", name="pretrain_schema", node=TrainConfig)
    cs.store(group="task", name="export_schema", node=ExportConfig)
    cs.store(group="task", name="generate_schema", node=GenerateConfig)
    cs.store(group="task", name="prune_schema", node=PruneConfig)
    cs.store(group="task", name="finetune_schema", node=FinetuneConfig)
    cs.store(group="task", name="prompt_tune_schema", node=PromptTuneConfig)
    cs.store(group="task", name="evaluate_schema", node=EvaluateConfig)
    if not OmegaConf.has_resolver("pkg_data"):
        OmegaConf.register_new_resolver("pkg_data", _package_data)


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the config as the CLI does (for tests and notebooks), `hydra:` interpolations included."""
    register_configs()
    with initialize_config_module("modelzoo.conf", version_base="1.3"):
        cfg = compose("config", overrides=with_detected_format(list(overrides)), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def to_object(cfg: DictConfig) -> Config:
    """The composed config as library dataclasses, refusing keys the schema lacks (even ones added with `+`)."""
    _check_known_keys(cfg, "")
    return OmegaConf.to_object(cfg)


def _check_known_keys(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in known:
                raise ConfigError(f"{prefix}{key}", "unknown key", known)
    for key, value in node.items_ex(resolve=False):
        if not isinstance(value, (DictConfig, ListConfig)) or node[key] is None:  # e.g. sparsity.groups: None
            continue
        if isinstance(value, DictConfig):
            _check_known_keys(value, f"{prefix}{key}.")
        elif isinstance(value, ListConfig):  # e.g. sparsity.groups, a list of typed blocks
            for i, item in enumerate(value):
                if isinstance(item, DictConfig):
                    _check_known_keys(item, f"{prefix}{key}[{i}].")


def resolved_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def validate(cfg: Config) -> None:
    """Reject every invalid value before any compute, naming the key and what is allowed."""
    _validate_model(cfg.model)
    cfg.sparsity.validate()
    _validate_data(cfg.data, cfg.model)
    if isinstance(cfg.task, TrainConfig):
        _validate_train(cfg.task, cfg.optim)
        device = resolved_device(cfg.task.device)
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("task.device", "cuda requested but no CUDA device is visible", ["auto", "cpu"])
        backend = resolve_name(cfg.backend.name)
        _validate_cluster(cfg, backend, device)
        for algorithm in cfg.sparsity.algorithms or [None]:
            check_supports(backend, algorithm=algorithm, device=device, dtype=cfg.task.precision, train=True)
        BACKENDS[backend].check_config(cfg.sparsity)
    elif cfg.compile_only or cfg.validate_only:
        raise ConfigError("compile_only" if cfg.compile_only else "validate_only", "applies to pretrain only")
    if isinstance(cfg.task, FinetuneConfig):  # the model and its sparsity come from task.pretrained
        validate_finetune(cfg.task)
        return
    if cfg.sparsity.enabled:
        with torch.device("meta"):
            plan_groups(cfg.sparsity, GPT(cfg.model))


def _validate_cluster(cfg: Config, backend: str, device: str) -> None:
    """The `cluster` node, and the CS-2 modes: they need backend=cerebras on a CSX cluster."""
    cfg.cluster.validate(device)
    target = cfg.cluster.resolved_target(device)
    if backend == "cerebras" and world_size() > 1:
        raise ConfigError(
            "backend.name",
            "cerebras scales out on a CS-2 cluster (cluster.num_csx), not under torchrun: run one process, or use",
            ["masked_dense"],
        )
    if backend != "cerebras" and cfg.cluster.target != "auto":
        raise ConfigError(
            "cluster.target", f"{target} is a cstorch backend: use backend=cerebras, or cluster=local with {backend}"
        )
    if cfg.compile_only and cfg.validate_only:
        raise ConfigError("validate_only", "compile_only already validates; set one of the two")
    lowering = "compile_only" if cfg.compile_only else "validate_only" if cfg.validate_only else None
    if lowering and (backend != "cerebras" or target != "CSX"):
        raise ConfigError(lowering, "lowers for a CS-2: it needs backend=cerebras cluster=cs2")
    missing = cfg.cluster.missing_for_submission()
    if target == "CSX" and not lowering and missing:
        raise ConfigError(
            missing[0].split("=")[0],
            f"a CS-2 run needs {' and '.join(missing)}; compile_only=true or validate_only=true lower the model "
            "offline without them",
        )
    if target == "CSX" and cfg.task.micro_batch_size != cfg.task.batch_size:
        raise ConfigError(
            "task.micro_batch_size",
            f"a CS-2 splits batches itself: set task.micro_batch_size={cfg.task.batch_size} (= task.batch_size)",
        )


def _validate_model(m: GPTConfig) -> None:
    for key in ("n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key}", f"must be positive, got {getattr(m, key)}")
    if m.n_embd % m.n_head:
        raise ConfigError("model.n_head", f"n_embd={m.n_embd} is not divisible by n_head={m.n_head}")
    if m.activation not in ACTIVATIONS:
        raise ConfigError("model.activation", f"unknown {m.activation!r}", sorted(ACTIVATIONS))
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", f"{m.dropout} is outside [0, 1)")


def _validate_data(d: DataConfig, m: GPTConfig) -> None:
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


def _validate_train(t: TrainConfig, o: OptimConfig) -> None:
    for key in ("max_steps", "batch_size", "micro_batch_size", "log_every", "eval_every", "checkpoint_every"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"task.{key}", f"must be positive, got {getattr(t, key)}")
    per_step = t.micro_batch_size * world_size()  # one micro-batch on each torchrun rank
    if t.batch_size % per_step:
        ranks = f" x {world_size()} ranks" if world_size() > 1 else ""
        raise ConfigError(
            "task.batch_size",
            f"{t.batch_size} is not divisible by task.micro_batch_size={t.micro_batch_size}{ranks}",
            [n for n in range(per_step, 4 * per_step + 1, per_step)],
        )
    if t.keep_checkpoints < 1:
        raise ConfigError("task.keep_checkpoints", f"must be at least 1, got {t.keep_checkpoints}")
    if t.precision not in PRECISIONS:
        raise ConfigError("task.precision", f"unknown {t.precision!r}", PRECISIONS)
    if t.device not in DEVICES:
        raise ConfigError("task.device", f"unknown {t.device!r}", DEVICES)
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

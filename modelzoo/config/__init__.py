"""Hydra structured configs: the library's config dataclasses, registered in the ConfigStore (schema only).

`conf/` holds the YAML options of each group; every node is typed by a dataclass here, so an unknown key or a
wrongly typed value fails while the config is composed. The `model` and `task` nodes are typed by the option chosen:
each option names its schema in its defaults list (`gpt_schema`, `llama_schema`; `pretrain_schema`, ...).
`modelzoo.validate` then checks what types cannot (ranges, divisibility, a `param_filter` that selects nothing),
before any data is read or model built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from modelzoo.cluster import ClusterConfig
from modelzoo.config.evaluate import EvaluateConfig
from modelzoo.config.experiment import ExperimentConfig
from modelzoo.config.finetune import FinetuneConfig, PromptTuneConfig
from modelzoo.config.prune import PruneConfig
from modelzoo.config.train import OptimConfig, TrainConfig
from modelzoo.data.config import DataConfig, TokenizerConfig, with_own_files_defaults
from modelzoo.errors import ConfigError
from modelzoo.models.registry import FAMILIES, config_class
from modelzoo.sparsity.config import SparsityConfig


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
    converter: str = "none"  # the inference converter (modelzoo.backends.converters): none | torch_sparse


@dataclass
class Config:
    model: Any = MISSING  # GPTConfig | LlamaConfig: typed by the chosen model option (its `family`)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    task: Any = MISSING  # TrainConfig | ExportConfig | GenerateConfig: typed by the chosen task option
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    seed: int = 1234
    run_dir: str = "runs/default"


def _package_data(relative: str) -> str:
    """Absolute path of a file shipped inside the `modelzoo` package (`${pkg_data:samples/...}`)."""
    return str(resources.files("modelzoo").joinpath("data", relative))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for family, (schema, _) in FAMILIES.items():
        cs.store(group="model", name=f"{family}_schema", node=schema)
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
        try:
            cfg = compose("config", overrides=with_own_files_defaults(list(overrides)), return_hydra_config=True)
        except ConfigCompositionException as e:
            unknown = _unknown_key(e)
            if unknown is None:
                raise
            raise unknown from e
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def config_from_yaml(config_yaml: str) -> Config:
    """A saved run config (YAML) as the library's `Config`, defaults filled in for keys it predates.

    The `model` node is typed by its `family` (a config saved before Llama existed has none: GPT).
    """
    saved = OmegaConf.create(config_yaml)
    base = OmegaConf.structured(Config)
    base.model = OmegaConf.structured(config_class(saved.get("model", {}).get("family", "gpt")))
    return OmegaConf.to_object(OmegaConf.merge(base, saved))


def model_option_yaml(model: Any) -> str:
    """`model` (a family's config) as an option file of the `model` group, naming its schema."""
    return f"defaults:\n  - {model.family}_schema\n  - _self_\n" + OmegaConf.to_yaml(OmegaConf.structured(model))


def _unknown_key(error: ConfigCompositionException) -> ConfigError | None:
    """Our error for an override of a key the schema lacks, naming the known keys; Hydra's own hint (append it
    with `+key=value`) would only fail later, in `to_object`."""
    cause = error.__cause__
    schema = getattr(cause, "object_type", None)
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not dataclasses.is_dataclass(schema):
        return None
    return ConfigError(cause.full_key, "unknown key", [f.name for f in dataclasses.fields(schema)])


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

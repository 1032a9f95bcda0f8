"""`task.init_from=DIR`: the model's shape and the tokenizer come from the Hugging Face directory the run starts from.

A run that starts from DIR's weights must be DIR's network and read DIR's token ids. So the command line is
completed before it is composed (`with_init_from`): the model option becomes DIR's `config.json` as our config
(through the family's rename table, `modelzoo.export.hf.from_hf_config`), and `tokenizer.path` is set to DIR when DIR
holds a tokenizer. What the user gave explicitly is kept but must
agree: a `model=` option, a `model.<key>` or a tokenizer that differs from DIR's is refused naming the key and both
values (otherwise a new BPE trained on the corpus would silently remap the ids the weights were trained on). Our own
settings that `config.json` does not describe (`NOT_SHAPE`) stay the user's.

Pre-training composes its config twice (once to validate, once under `hydra.main`), so the completion is a rewrite
of the overrides (plus the `model` option it selects), applied to both, not a change to a composed config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra.core.config_store import ConfigStore
from transformers import AutoConfig, AutoTokenizer

from modelzoo.config import load_config, to_object
from modelzoo.data.tokenizer import holds_tokenizer, load_pretrained
from modelzoo.errors import ConfigError
from modelzoo.export.hf import from_hf_config
from modelzoo.models.registry import ModelConfig

KEY = "task.init_from"
OPTION = "init_from"  # the `model` option holding DIR's config
# Model fields that are our settings rather than the network DIR's config.json describes.
NOT_SHAPE = ("name", "init_std", "dropout", "padded_vocab_multiple")


def with_init_from(overrides: list[str]) -> list[str]:
    """`overrides` completed from `task.init_from=DIR` (module docstring); unchanged without one.

    DIR's model config is stored as the `model` option `init_from` (in Hydra's in-process `ConfigStore`, so nothing
    is written to disk) and chosen unless a `model=` option is given.

    Raises:
        ConfigError: DIR has no `config.json` or describes a network our models cannot represent; an explicit
            `model` option, `model.<key>` or tokenizer disagrees with DIR (named with both values).
    """
    given = [o.partition("=")[2] for o in overrides if o.startswith(f"{KEY}=")]
    if not given or given[-1] in ("", "null"):
        return overrides
    directory = Path(given[-1].strip("'\""))
    if not (directory / "config.json").is_file():
        raise ConfigError(KEY, f"{directory} has no config.json; give a Hugging Face directory (an export, a prune)")
    theirs = from_hf_config(AutoConfig.from_pretrained(directory, local_files_only=True), name=directory.name)
    ConfigStore.instance().store(group="model", name=OPTION, node=theirs)
    option = any(o.startswith("model=") for o in overrides)
    completed = overrides if option else [f"model={OPTION}", *overrides]
    ours = to_object(load_config(completed))
    explicit = {o.partition("=")[0].split(".")[1] for o in overrides if o.startswith("model.")}
    _check_model(ours.model, theirs, explicit | _shape_fields(theirs) if option else explicit, directory)
    if holds_tokenizer(directory):
        if any(o.startswith(("tokenizer=", "tokenizer.")) for o in overrides):
            _check_tokenizer(ours.tokenizer.path, directory)
        quoted = str(directory).replace("\\", "\\\\").replace("'", "\\'")
        completed = [*completed, f"tokenizer.path='{quoted}'"]
    return completed


def _shape_fields(config: ModelConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(config) if f.name not in NOT_SHAPE}


def _check_model(ours: ModelConfig, theirs: ModelConfig, keys: set[str], directory: Path) -> None:
    """Refuse the first of `keys` (and the family) where the composed model differs from DIR's."""
    if ours.family != theirs.family:
        raise ConfigError(
            "model.family", f"{ours.family} but {KEY}={directory} holds a {theirs.family} model; leave model= out"
        )
    for key in sorted(keys - set(NOT_SHAPE)):
        mine, its = getattr(ours, key, None), getattr(theirs, key, None)
        if mine != its:
            raise ConfigError(
                f"model.{key}", f"{mine} but {KEY}={directory} has {its}; leave it out to take the directory's"
            )


def _check_tokenizer(path: str | None, directory: Path) -> None:
    """Refuse an explicit tokenizer whose vocabulary is not DIR's (a BPE trained on the corpus never is)."""
    if path is None:
        raise ConfigError(
            "tokenizer.path",
            f"null (a BPE trained on the corpus) but {KEY}={directory} holds the tokenizer its weights were trained "
            "with; leave tokenizer out to use it",
        )
    if load_pretrained(path).get_vocab() != AutoTokenizer.from_pretrained(directory).get_vocab():
        raise ConfigError(
            "tokenizer.path",
            f"{path} has another vocabulary than the tokenizer in {KEY}={directory}; leave tokenizer out to use it",
        )

"""Cerebras Model Zoo params YAML <-> our configs (model, optimizer and schedule, batch, steps, sparsity).

The model block's `name` picks the family: `gpt2`/`gpt3` (or none, as in 2.0 files) our GPT, `llama` our Llama
(their `GPT2LMHeadModel` configured with `norm_type: rmsnorm`, `nonlinearity: swiglu`, rotary embeddings,
`multiquery_attention` for grouped-query heads and `pos_scaling_type: llama3`). One reader serves both: the
shape keys are shared, and each family's table (`FAMILIES`) lists the options it has at one value only and the
keys it reads and writes.

Read dialects (the sections are found wherever the release puts them):
- 2.0-2.2 "runconfig" files: `model`, `optimizer` (`optimizer_type`, `learning_rate` as a number or a list of
  `{scheduler: Linear|CosineDecay|Constant, ...}` phases), `train_input`, `runconfig.max_steps`, `sparsity`;
- 2.3+ "trainer" files: the same blocks under `trainer.init` (`optimizer: {AdamW: {...}}`, `schedulers` with a
  `SequentialLR`, `precision.max_gradient_norm`, `loop.max_steps`) and `trainer.fit.train_dataloader`.

The `sparsity` block may be a number, one block, a list of blocks or `{groups: [...]}`, in any of the key
dialects: 2.0's `type:` with `param_name_patterns` (a regex, a list of regexes or a dict of regex -> per-pattern
overrides, matched with `re.search`), `schedule: {freq, stop}` (the update steps) and `sparsity_schedule:
[[step, level], ...]`; 2.2+'s `algorithm:`, `update:` and `param_filter` globs. Regexes are evaluated against the
Cerebras spelling of every parameter of the model the file describes and turned into globs over our names;
globs that already select the same parameters are kept unchanged, so a 2.2 recipe round-trips by copy.

Written back as a 2.2 runconfig-style file (`algorithm`, `update`, `param_filter` in Cerebras names), which this
module reads to the same configs. Anything our models or trainer cannot represent is refused with one sentence
naming the file and the key, never approximated silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import yaml

from modelzoo.config import model_option_yaml
from modelzoo.config.train import OptimConfig, TrainConfig
from modelzoo.errors import ConfigError
from modelzoo.models.gpt import ACTIVATIONS, GPTConfig
from modelzoo.models.llama import LlamaConfig, RopeScaling
from modelzoo.models.registry import build_model
from modelzoo.sparsity.config import SparsityConfig, SparsityGroupConfig
from modelzoo.sparsity.names import cerebras_names, select_parameters
from modelzoo.sparsity.plan import plan_groups

ModelConfig = GPTConfig | LlamaConfig

# Cerebras key -> our config field, the same in both families (HF GPT-2's names).
MODEL_KEYS = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_heads": "n_head",
    "filter_size": "n_inner",
    "max_position_embeddings": "n_positions",
    "vocab_size": "vocab_size",
}
# The Model Zoo's value of each option below where a file leaves it out (its `GPT2LMHeadModelConfig`, which its
# Llama configures): a Llama file that omits `norm_type` gets LayerNorm.
MODELZOO_DEFAULTS = {
    "position_embedding_type": "learned",
    "use_position_embedding": True,
    "share_embedding_weights": True,
    "attention_type": "scaled_dot_product",
    "use_projection_bias_in_attention": True,
    "use_ffn_bias_in_attention": True,
    "use_ffn_bias": True,
    "use_bias_in_output": False,
    "norm_type": "layernorm",
    "embedding_layer_norm": False,
    "norm_first": True,
    "fixed_sparse_attention": None,
    "attention_module": "aiayn_attention",
    "nonlinearity": "gelu",
    "rope_theta": 10000.0,
    "pos_scaling_type": "linear",
    "pos_scaling_factor": 1.0,
}
# Options a family implements at one value only: (key, that value, what our model does).
SHARED_FIXED = (
    ("attention_type", "scaled_dot_product", "our attention scales scores by 1/sqrt(head_dim)"),
    ("use_bias_in_output", False, "our lm_head has no bias"),
    ("norm_first", True, "our blocks are pre-norm"),
    ("fixed_sparse_attention", None, "our attention is dense and causal"),
)
GPT_FIXED = (
    *SHARED_FIXED,
    ("position_embedding_type", "learned", "our GPT has learned absolute position embeddings only"),
    ("use_position_embedding", True, "our GPT always adds position embeddings"),
    ("share_embedding_weights", True, "our lm_head is tied to the token embedding"),
    ("use_projection_bias_in_attention", True, "our attention projections have biases"),
    ("use_ffn_bias_in_attention", True, "our attention output projection has a bias"),
    ("use_ffn_bias", True, "our MLP layers have biases"),
    ("norm_type", "layernorm", "our blocks use LayerNorm"),
    ("embedding_layer_norm", False, "our GPT has no LayerNorm after the embeddings"),
    ("attention_module", "aiayn_attention", "our attention is multi-head attention"),
)
LLAMA_FIXED = (
    *SHARED_FIXED,
    ("position_embedding_type", "rotary", "our Llama has rotary position embeddings"),
    ("use_position_embedding", True, "our Llama always rotates queries and keys"),
    ("use_projection_bias_in_attention", False, "our attention projections have no biases"),
    ("use_ffn_bias_in_attention", False, "our attention output projection has no bias"),
    ("use_ffn_bias", False, "our MLP layers have no biases"),
    ("norm_type", "rmsnorm", "our blocks use RMSNorm"),
    ("embedding_layer_norm", False, "our Llama has no norm after the embeddings"),
    ("nonlinearity", "swiglu", "our MLP is a SwiGLU (silu(gate) * up)"),
)
# The keys only the Llama dialect reads, and `pos_scaling_extra_args` of `pos_scaling_type: llama3` with the
# defaults the Model Zoo's `_llama_3_update_inv_freq` gives the ones a file leaves out.
LLAMA_KEYS = (
    "rotary_dim",
    "rope_theta",
    "share_embedding_weights",
    "attention_module",
    "extra_attention_params",
    "pos_scaling_type",
    "pos_scaling_factor",
    "pos_scaling_extra_args",
)
LLAMA3_SCALING_ARGS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Keys that do not change the network (initialisers other than `initializer.std`, loss scaling, CS-2 numerics).
IGNORED_MODEL_KEYS = {
    "embedding_initializer",
    "output_layer_initializer",
    "loss_scaling",
    "loss_weight",
    "mixed_precision",
    "fp16_type",
    "use_bfloat16",
    "precision_opt_level",
    "boundary_casting",
    "tf_summary",
    "attention_softmax_fp32",
}
DROPOUT_KEYS = ("dropout_rate", "attention_dropout_rate", "embedding_dropout_rate")
SPARSITY_KEYS = ("sparsity", "init_method", "algorithm", "update", "drop_fraction", "param_filter")
LEGACY_SPARSITY_KEYS = ("type", "schedule", "sparsity_schedule", "param_name_patterns")
UPDATE_KEYS = {"freq", "start", "stop", "steps"}
# cstorch AdamW defaults, used when a file leaves a key out.
ADAMW_DEFAULTS = {"betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0}


@dataclass
class CerebrasRecipe:
    """What a params file sets, as our configs: the network, sparsity, optimizer, and the loop's length and batch."""

    model: ModelConfig
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seq_len: int | None = None  # None: the model's context length

    def __post_init__(self) -> None:
        if self.seq_len is None:
            self.seq_len = self.model.n_positions


@dataclass
class _Sections:
    """The blocks of one params file wherever its dialect keeps them, with their dotted keys for messages."""

    model: tuple[str, Any]
    optimizer: tuple[str, Any]
    schedulers: tuple[str, Any]
    max_gradient_norm: tuple[str, Any]
    sparsity: tuple[str, Any]
    max_steps: tuple[str, Any]
    batch_size: tuple[str, Any]
    micro_batch_size: tuple[str, Any]
    max_sequence_length: tuple[str, Any]


class _Reader:
    """Helpers that raise `ConfigError`s naming the file and the dotted key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, message: str, allowed: Any = None) -> ConfigError:
        return ConfigError(f"{self.path}: {key}", message, allowed)

    def mapping(self, key: str, value: Any) -> dict:
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping, got {value!r}")
        return dict(value)

    def number(self, key: str, value: Any, kind: type = float) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise self.error(key, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        return kind(value)


def read_params(path: str | Path) -> CerebrasRecipe:
    """Our configs from a Cerebras Model Zoo GPT-2/GPT-3 or Llama params YAML; a `ConfigError` names file and key."""
    path = Path(path)
    with path.open() as f:
        raw = yaml.safe_load(f)
    r = _Reader(path)
    s = _sections(r, r.mapping("(top level)", raw))
    model = _read_model(r, *s.model, name=path.stem)
    max_steps = None if s.max_steps[1] is None else r.number(s.max_steps[0], s.max_steps[1], int)
    optim, max_steps = _read_optim(r, s, max_steps)
    if s.batch_size[1] is None:
        raise r.error(s.batch_size[0], "is missing; the global batch size (sequences per step) is needed")
    batch = r.number(s.batch_size[0], s.batch_size[1], int)
    micro = s.micro_batch_size[1]
    micro = r.number(s.micro_batch_size[0], micro, int) if isinstance(micro, (int, float)) else batch
    if batch % micro:
        raise r.error(s.micro_batch_size[0], f"{micro} does not divide batch_size={batch}")
    train = TrainConfig(max_steps=max_steps or TrainConfig.max_steps, batch_size=batch, micro_batch_size=micro)
    seq_len = s.max_sequence_length[1] or model.n_positions
    seq_len = r.number(s.max_sequence_length[0], seq_len, int)
    if seq_len > model.n_positions:
        raise r.error(s.max_sequence_length[0], f"{seq_len} exceeds max_position_embeddings={model.n_positions}")
    sparsity = _read_sparsity(r, *s.sparsity, model=model)
    return CerebrasRecipe(model=model, sparsity=sparsity, optim=optim, train=train, seq_len=seq_len)


def _sections(r: _Reader, raw: dict) -> _Sections:
    if "trainer" in raw:
        trainer = raw["trainer"]
        if not isinstance(trainer, Mapping):
            raise r.error("trainer", "holds several trainer phases; import one phase per file")
        init = r.mapping("trainer.init", trainer.get("init"))
        fit = r.mapping("trainer.fit", trainer.get("fit") or {})
        data = r.mapping("trainer.fit.train_dataloader", fit.get("train_dataloader") or {})
        precision = r.mapping("trainer.init.precision", init.get("precision") or {})
        loop = r.mapping("trainer.init.loop", init.get("loop") or {})
        at = "trainer.init."
        return _Sections(
            model=(at + "model", init.get("model")),
            optimizer=(at + "optimizer", init.get("optimizer")),
            schedulers=(at + "schedulers", init.get("schedulers")),
            max_gradient_norm=(at + "precision.max_gradient_norm", precision.get("max_gradient_norm")),
            sparsity=(at + "sparsity", init.get("sparsity")),
            max_steps=(at + "loop.max_steps", loop.get("max_steps")),
            batch_size=("trainer.fit.train_dataloader.batch_size", data.get("batch_size")),
            micro_batch_size=("trainer.fit.train_dataloader.micro_batch_size", data.get("micro_batch_size")),
            max_sequence_length=("trainer.fit.train_dataloader.max_sequence_length", data.get("max_sequence_length")),
        )
    optimizer = r.mapping("optimizer", raw.get("optimizer") or {})
    data = r.mapping("train_input", raw.get("train_input") or {})
    runconfig = r.mapping("runconfig", raw.get("runconfig") or {})
    return _Sections(
        model=("model", raw.get("model")),
        optimizer=("optimizer", optimizer),
        schedulers=("optimizer.learning_rate", optimizer.get("learning_rate")),
        max_gradient_norm=("optimizer.max_gradient_norm", optimizer.get("max_gradient_norm")),
        sparsity=("sparsity", raw.get("sparsity")),
        max_steps=("runconfig.max_steps", runconfig.get("max_steps")),
        batch_size=("train_input.batch_size", data.get("batch_size")),
        micro_batch_size=("train_input.micro_batch_size", data.get("micro_batch_size")),
        max_sequence_length=("train_input.max_sequence_length", data.get("max_sequence_length")),
    )


# ---- model ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    """How the params files spell one of our model families beyond the shape keys they share."""

    names: tuple[str, ...]  # the model block's `name`s that mean this family; the first is written
    config: type
    fixed: tuple[tuple[str, Any, str], ...]  # options at one value only (key, that value, what our model does)
    keys: tuple[str, ...]  # what `read` reads besides the shape, dropouts, norm epsilon and initializer
    read: Callable[[_Reader, str, dict, dict], dict]  # (reader, block key, block, shape) -> config fields
    write: Callable[[Any], dict]  # config -> block keys beyond the shape, fixed options and initializer


def _read_model(r: _Reader, key: str, block: Any, name: str) -> ModelConfig:
    m = r.mapping(key, block)
    family = _family(r, key, m)
    fixed = {k for k, _, _ in family.fixed}
    handled = {*MODEL_KEYS, *fixed, *family.keys, *DROPOUT_KEYS, "name", "nonlinearity", "layer_norm_epsilon"}
    handled |= {"initializer", "initializer_range"}
    unknown = sorted(k for k in m if k not in handled | IGNORED_MODEL_KEYS)
    if unknown:
        raise r.error(f"{key}.{unknown[0]}", "is not understood by this importer, so the model cannot be guaranteed")
    for option, supported, ours in family.fixed:
        value = m.get(option, MODELZOO_DEFAULTS[option])
        if value != supported:
            said = repr(value) if option in m else f"absent, so the Model Zoo default {value!r} applies, which"
            raise r.error(f"{key}.{option}", f"{said} cannot be imported: {ours}", [supported])
    shape = {}
    for theirs, ours in MODEL_KEYS.items():
        if theirs not in m:
            raise r.error(f"{key}.{theirs}", "is missing; the model's shape needs it")
        shape[ours] = r.number(f"{key}.{theirs}", m[theirs], int)
    init = m.get("initializer")
    if isinstance(init, Mapping) and "std" in init:
        init_std = r.number(f"{key}.initializer.std", init["std"])
    else:
        init_std = r.number(f"{key}.initializer_range", m.get("initializer_range", 0.02))
    return family.config(name=name, **shape, init_std=init_std, **family.read(r, key, m, shape))


def _family(r: _Reader, key: str, m: dict) -> _Family:
    """The family the block's `name` means (a file without one, as 2.0's, is a GPT)."""
    name = m.get("name", FAMILIES["gpt"].names[0])
    for family in FAMILIES.values():
        if name in family.names:
            return family
    raise r.error(f"{key}.name", f"{name!r} is not a model we have", [n for f in FAMILIES.values() for n in f.names])


def _dropouts(r: _Reader, key: str, m: dict) -> dict[str, float]:
    if "dropout_rate" not in m:
        raise r.error(f"{key}.dropout_rate", "is missing; give it explicitly (release defaults differ)")
    return {k: r.number(f"{key}.{k}", m.get(k, m["dropout_rate"])) for k in DROPOUT_KEYS}


def _read_gpt(r: _Reader, key: str, m: dict, shape: dict) -> dict:
    dropouts = _dropouts(r, key, m)
    if len(set(dropouts.values())) > 1:
        raise r.error(
            f"{key}.{'/'.join(DROPOUT_KEYS)}", f"{dropouts} differ; our GPT has one dropout rate for all three"
        )
    activation = m.get("nonlinearity", MODELZOO_DEFAULTS["nonlinearity"])
    if activation not in ACTIVATIONS:
        raise r.error(f"{key}.nonlinearity", f"{activation!r} is not implemented", sorted(ACTIVATIONS))
    return dict(
        activation=activation,
        layer_norm_epsilon=r.number(f"{key}.layer_norm_epsilon", m.get("layer_norm_epsilon", 1e-5)),
        dropout=dropouts["dropout_rate"],
    )


def _write_gpt(c: GPTConfig) -> dict:
    return {"dropout_rate": c.dropout, "layer_norm_epsilon": c.layer_norm_epsilon, "nonlinearity": c.activation}


def _read_llama(r: _Reader, key: str, m: dict, shape: dict) -> dict:
    for k, rate in _dropouts(r, key, m).items():
        if rate:
            raise r.error(f"{key}.{k}", f"{rate} cannot be imported: our Llama has no dropout", [0.0])
    head_dim = shape["n_embd"] // shape["n_head"]
    if "rotary_dim" not in m:
        raise r.error(
            f"{key}.rotary_dim",
            f"is missing, so the Model Zoo rotates a quarter of each head; our Llama rotates all of it: give "
            f"rotary_dim: {head_dim}",
        )
    rotary_dim = r.number(f"{key}.rotary_dim", m["rotary_dim"], int)
    if rotary_dim != head_dim:
        raise r.error(
            f"{key}.rotary_dim", f"{rotary_dim} cannot be imported: our Llama rotates whole heads", [head_dim]
        )
    tied = m.get("share_embedding_weights", MODELZOO_DEFAULTS["share_embedding_weights"])
    if not isinstance(tied, bool):
        raise r.error(f"{key}.share_embedding_weights", f"must be true or false, got {tied!r}")
    return dict(
        n_kv_head=_kv_heads(r, key, m, shape["n_head"]),
        rope_theta=r.number(f"{key}.rope_theta", m.get("rope_theta", MODELZOO_DEFAULTS["rope_theta"])),
        rope_scaling=_rope_scaling(r, key, m),
        rms_norm_eps=r.number(f"{key}.layer_norm_epsilon", m.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=tied,
    )


def _kv_heads(r: _Reader, key: str, m: dict, n_head: int) -> int:
    """Key/value heads: `num_heads` under `aiayn_attention`, `extra_attention_params.num_kv_groups` (the Model Zoo's
    default 1) under `multiquery_attention`; their groups repeat each key/value head for consecutive query heads,
    as HF's `repeat_kv` does."""
    at = f"{key}.extra_attention_params"
    extra = r.mapping(at, m.get("extra_attention_params") or {})
    others = sorted(k for k in extra if k != "num_kv_groups")
    if others:
        raise r.error(f"{at}.{others[0]}", "cannot be imported", ["num_kv_groups"])
    module = m.get("attention_module", MODELZOO_DEFAULTS["attention_module"])
    if module == "aiayn_attention":
        if "num_kv_groups" in extra:
            raise r.error(f"{at}.num_kv_groups", "needs attention_module: multiquery_attention")
        return n_head
    if module != "multiquery_attention":
        raise r.error(
            f"{key}.attention_module",
            f"{module!r} cannot be imported: our Llama has multi-head or grouped-query attention",
            ["aiayn_attention", "multiquery_attention"],
        )
    groups = r.number(f"{at}.num_kv_groups", extra.get("num_kv_groups", 1), int)
    if groups < 1 or n_head % groups:
        raise r.error(f"{at}.num_kv_groups", f"{groups} does not divide num_heads={n_head}")
    return groups


def _rope_scaling(r: _Reader, key: str, m: dict) -> RopeScaling | None:
    """`pos_scaling_type: llama3` as our `RopeScaling`; None for `linear` at factor 1 (no scaling)."""
    kind = m.get("pos_scaling_type", MODELZOO_DEFAULTS["pos_scaling_type"])
    factor = r.number(f"{key}.pos_scaling_factor", m.get("pos_scaling_factor", MODELZOO_DEFAULTS["pos_scaling_factor"]))
    if str(kind).lower() == "linear" and factor == 1.0:
        return None
    if str(kind).lower() != "llama3":
        raise r.error(
            f"{key}.pos_scaling_type",
            f"{kind!r} with pos_scaling_factor {factor} cannot be imported: our Llama implements Llama-3 frequency "
            "scaling only",
            ["llama3", "linear (at factor 1.0)"],
        )
    at = f"{key}.pos_scaling_extra_args"
    extra = r.mapping(at, m.get("pos_scaling_extra_args") or {})
    unknown = sorted(set(extra) - set(LLAMA3_SCALING_ARGS))
    if unknown:
        raise r.error(f"{at}.{unknown[0]}", "is not an argument of llama3 scaling", sorted(LLAMA3_SCALING_ARGS))
    args = {k: r.number(f"{at}.{k}", extra.get(k, d), type(d)) for k, d in LLAMA3_SCALING_ARGS.items()}
    return RopeScaling(factor=factor, **args)


def _write_llama(c: LlamaConfig) -> dict:
    out: dict[str, Any] = {
        "rotary_dim": c.head_dim,
        "rope_theta": c.rope_theta,
        "share_embedding_weights": c.tie_word_embeddings,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": c.rms_norm_eps,
    }
    if c.n_kv_head != c.n_head:
        out.update(attention_module="multiquery_attention", extra_attention_params={"num_kv_groups": c.n_kv_head})
    if c.rope_scaling is not None:
        s = asdict(c.rope_scaling)
        out.update(pos_scaling_type="llama3", pos_scaling_factor=s.pop("factor"), pos_scaling_extra_args=s)
    return out


FAMILIES = {
    "gpt": _Family(("gpt2", "gpt3"), GPTConfig, GPT_FIXED, (), _read_gpt, _write_gpt),
    "llama": _Family(("llama", "LlamaModel"), LlamaConfig, LLAMA_FIXED, LLAMA_KEYS, _read_llama, _write_llama),
}


# ---- optimizer and learning-rate schedule ------------------------------------------------------------------------
def _read_optim(r: _Reader, s: _Sections, max_steps: int | None) -> tuple[OptimConfig, int | None]:
    key, block = s.optimizer
    opt = r.mapping(key, block)
    if "optimizer_type" in opt:  # runconfig dialect
        kind, args, args_key = opt["optimizer_type"], opt, key
    elif len(opt) == 1:  # trainer dialect: {AdamW: {...}}
        (kind, args), args_key = next(iter(opt.items())), f"{key}.{next(iter(opt))}"
        args = r.mapping(args_key, args or {})
    else:
        raise r.error(key, "names no optimizer (expected optimizer_type or one {AdamW: {...}} entry)")
    if str(kind).lower() != "adamw":
        at = f"{key}.optimizer_type" if args_key == key else args_key
        raise r.error(at, f"{kind!r} cannot be imported: our trainer uses AdamW (decoupled weight decay)", ["AdamW"])
    if args.get("correct_bias", True) is not True:
        raise r.error(f"{args_key}.correct_bias", "False cannot be imported: our AdamW corrects its bias", [True])
    betas = list(args.get("betas", ADAMW_DEFAULTS["betas"]))
    clip = s.max_gradient_norm[1]
    lr, warmup, decay, floor, total = _read_schedule(r, s.schedulers[0], s.schedulers[1], args.get("lr"))
    if total is not None:
        if max_steps is not None and max_steps != total:
            raise r.error(
                s.schedulers[0],
                f"its phases last {total} steps but max_steps is {max_steps}; our schedule decays until the last step",
            )
        max_steps = total
    optim = OptimConfig(
        lr=lr,
        betas=[r.number(f"{args_key}.betas", b) for b in betas],
        eps=r.number(f"{args_key}.eps", args.get("eps", ADAMW_DEFAULTS["eps"])),
        weight_decay=r.number(f"{args_key}.weight_decay", args.get("weight_decay", ADAMW_DEFAULTS["weight_decay"])),
        grad_clip=math.inf if clip is None else r.number(s.max_gradient_norm[0], clip),
        warmup_steps=warmup,
        decay=decay,
        min_lr_ratio=floor,
    )
    return optim, max_steps


def _phases(r: _Reader, key: str, spec: Any) -> list[tuple[str, str, dict]]:
    """(dotted key, kind, args) of each learning-rate phase, kinds normalised to linear | cosine | constant."""
    if spec is None:
        return []
    items = spec if isinstance(spec, list) else [spec]
    phases = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]" if isinstance(spec, list) else key
        item = r.mapping(at, item)
        if "scheduler" in item:  # runconfig dialect: {scheduler: Linear, ...}
            kind, args = item.pop("scheduler"), item
        elif len(item) == 1:  # trainer dialect: {LinearLR: {...}} or {SequentialLR: {schedulers: [...]}}
            kind, args = next(iter(item.items()))
            at = f"{at}.{kind}"
            args = r.mapping(at, args or {})
        else:
            raise r.error(at, "is not a learning-rate scheduler")
        name = str(kind).lower().removesuffix("lr")
        if name == "sequential":
            phases.extend(_phases(r, f"{at}.schedulers", args.get("schedulers")))
            continue
        normalised = {"linear": "linear", "cosinedecay": "cosine", "constant": "constant"}.get(name)
        if normalised is None:
            raise r.error(at, f"scheduler {kind!r} cannot be imported", ["Linear", "CosineDecay", "Constant"])
        phases.append((at, normalised, args))
    return phases


def _read_schedule(r: _Reader, key: str, spec: Any, optimizer_lr: Any) -> tuple[float, int, str, float, int | None]:
    """(peak lr, warm-up steps, decay, floor ratio, total steps or None) from a file's learning-rate phases.

    Our schedule is an optional linear warm-up from 0 followed by one cosine or linear decay to a floor that
    ends at the last step, or a constant: exactly the shape of every Cerebras GPT-3 and Llama recipe.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return float(spec), 0, "constant", 1.0, None
    phases = _phases(r, key, spec)
    if not phases:
        if optimizer_lr is None:
            raise r.error(key, "is missing; give a learning rate or its schedule")
        return r.number(f"{key}.lr", optimizer_lr), 0, "constant", 1.0, None
    shape = " then ".join(kind for _, kind, _ in phases)

    def unsupported() -> ConfigError:
        return r.error(
            key,
            f"{shape} cannot be imported: our schedule is a linear warm-up from 0, then one cosine, linear "
            "or constant phase",
        )

    warmup, peak_lr = 0, None
    at, kind, args = phases[0]
    warms_up = kind == "linear" and float(args.get("initial_learning_rate", -1)) == 0.0
    if len(phases) > 2 or (len(phases) == 2 and not warms_up):
        raise unsupported()
    if warms_up:
        warmup = r.number(f"{at}.total_iters", args.get("total_iters"), int)
        peak_lr = r.number(f"{at}.end_learning_rate", args.get("end_learning_rate"))
        if len(phases) == 1:  # a warm-up alone (the Llama 3.1 recipes): it lasts the whole run
            return peak_lr, warmup, "constant", 1.0, warmup
    at, kind, args = phases[-1]
    if kind == "constant":
        lr = r.number(f"{at}.learning_rate", args.get("learning_rate", peak_lr))
        if peak_lr is not None and lr != peak_lr:
            raise unsupported()
        return lr, warmup, "constant", 1.0, None
    lr = r.number(f"{at}.initial_learning_rate", args.get("initial_learning_rate"))
    end = r.number(f"{at}.end_learning_rate", args.get("end_learning_rate"))
    steps = r.number(f"{at}.total_iters", args.get("total_iters"), int)
    if peak_lr is not None and lr != peak_lr:
        raise r.error(f"{at}.initial_learning_rate", f"{lr} differs from the warm-up's end {peak_lr}")
    if lr <= 0 or not 0 <= end <= lr:
        raise r.error(f"{at}.end_learning_rate", f"{end} must lie in [0, initial_learning_rate={lr}]")
    return lr, warmup, kind, end / lr, warmup + steps


# ---- sparsity ---------------------------------------------------------------------------------------------------
def _spellings(name: str) -> tuple[str, ...]:
    """The Cerebras names one of our parameters goes by across releases, with and without the `model.` prefix."""
    names = list(cerebras_names(name))
    names += [n.replace(".position_embeddings.", ".position_embeddings.embed.") for n in names if "position" in n]
    return (*names, *(f"model.{n}" for n in names))


def _blocks(r: _Reader, key: str, spec: Any) -> list[tuple[str, dict]]:
    """The sparsity groups of a block in any dialect, as (dotted key, dict) pairs (an empty list: dense)."""
    if spec is None:
        return []
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return [(key, {"sparsity": spec})]
    if isinstance(spec, list):
        return [(f"{key}[{i}]", r.mapping(f"{key}[{i}]", g)) for i, g in enumerate(spec)]
    block = r.mapping(key, spec)
    if "groups" in block:
        groups = block.pop("groups")
        if block:
            raise r.error(f"{key}.{next(iter(block))}", "set it in each of groups[i]")
        groups = groups if isinstance(groups, list) else [groups]
        flat = [{k: v for k, v in g.items() if k != "params"} | (g.get("params") or {}) for g in groups]
        return [(f"{key}.groups[{i}]", g) for i, g in enumerate(flat)]
    patterns = block.get("param_name_patterns")
    if isinstance(patterns, Mapping):  # 2.0: {regex: overrides or None}, one group per pattern
        base = {k: v for k, v in block.items() if k != "param_name_patterns"}
        return [
            (f"{key}.param_name_patterns[{p!r}]", {**base, **(overrides or {}), "param_name_patterns": p})
            for p, overrides in patterns.items()
        ]
    return [(key, block)]


def _group(r: _Reader, key: str, g: dict) -> tuple[dict, Callable[[str], bool] | None, str]:
    """Our group keys from one Cerebras block, its name filter (None: the default) and the filter's key."""
    g = dict(g)
    unknown = [k for k in g if k not in (*SPARSITY_KEYS, *LEGACY_SPARSITY_KEYS)]
    if unknown:
        raise r.error(f"{key}.{unknown[0]}", "cannot be imported", [*SPARSITY_KEYS, *LEGACY_SPARSITY_KEYS])
    if "type" in g and "algorithm" in g:
        raise r.error(f"{key}.type", "give algorithm or its deprecated alias type, not both")
    algorithm = str(g.pop("algorithm", g.pop("type", "static"))).lower()
    out: dict[str, Any] = {"algorithm": algorithm}
    if algorithm == "sideband":  # 1.x: static, the mask travels in the checkpoint as NaN weights
        out.update(algorithm="static", init_method="from_zeros")
    if "schedule" in g:
        schedule = g.pop("schedule")
        if isinstance(schedule, Mapping) and set(schedule) <= UPDATE_KEYS:  # 2.0: the mask-update steps
            out["update"] = dict(schedule)
        elif "sparsity" not in g:  # 2.2+: an alias of `sparsity`
            out["sparsity"] = schedule
        else:
            raise r.error(f"{key}.schedule", "is neither update steps ({freq, start, stop}) nor a sparsity alias")
    if "sparsity_schedule" in g:  # 2.0: [[step, level], ...]
        pairs = g.pop("sparsity_schedule")
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise r.error(f"{key}.sparsity_schedule", f"must be a list of [step, sparsity] pairs, got {pairs!r}")
        out["update"] = {"steps": [p[0] for p in pairs]}
        out["sparsity"] = [p[1] for p in pairs]
    for k in ("sparsity", "init_method", "update", "drop_fraction"):
        if k in g:
            out[k] = g.pop(k)
    if "param_filter" in g and "param_name_patterns" in g:
        raise r.error(f"{key}.param_name_patterns", "give param_filter (globs) or param_name_patterns, not both")
    if "param_name_patterns" in g:
        regexes = g.pop("param_name_patterns")
        regexes = [regexes] if isinstance(regexes, str) else regexes
        try:
            compiled = [re.compile(p) for p in regexes]
        except (re.error, TypeError) as e:
            raise r.error(f"{key}.param_name_patterns", f"{regexes!r} is not a regex or a list of them ({e})") from e
        return out, lambda s: any(c.search(s) for c in compiled), f"{key}.param_name_patterns"
    if "param_filter" in g:
        globs = g.pop("param_filter")
        out["param_filter"] = globs = [globs] if isinstance(globs, str) else list(globs)
        return out, lambda s: any(fnmatchcase(s, p) for p in globs), f"{key}.param_filter"
    return out, None, f"{key}.param_filter"


def compact_globs(selected: list[str], universe: list[str]) -> list[str]:
    """Globs that select exactly `selected` out of `universe`: a block index becomes `*` where every block is in."""
    chosen = set(selected)
    globs: list[str] = []
    for name in selected:
        if any(fnmatchcase(name, g) for g in globs):
            continue
        # Every index a wildcard (all blocks, all sub-layers), then the block index only, then the name itself.
        for template in (re.sub(r"\.\d+\.", ".*.", name), re.sub(r"\.\d+\.", ".*.", name, count=1), name):
            if chosen.issuperset(n for n in universe if fnmatchcase(n, template)):
                globs.append(template)
                break
    return globs


def _read_sparsity(r: _Reader, key: str, spec: Any, model: ModelConfig) -> SparsityConfig:
    with torch.device("meta"):
        gpt = build_model(model)
    params = dict(gpt.named_parameters())
    names = list(params)
    groups, taken = [], set()
    for at, block in _blocks(r, key, spec):
        out, selects, filter_key = _group(r, at, block)
        if selects is None:  # the default filter; later groups get what it leaves
            taken.update(select_parameters(gpt, None))
        else:
            picked = [n for n in names if n not in taken and any(selects(s) for s in _spellings(n))]
            if not picked:
                earlier = " that an earlier group has not taken" if taken else ""
                raise r.error(
                    filter_key,
                    f"selects no parameter of this model{earlier} (Cerebras names such as "
                    "'transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight')",
                )
            _check_fused_qkv(r, filter_key, picked, selects)
            if select_parameters(gpt, out.get("param_filter")) != picked:
                out["param_filter"] = compact_globs(picked, names)
            taken.update(picked)
        groups.append((at, out))
    config = _sparsity_config([g for _, g in groups])
    try:
        config.validate()
        plan_groups(config, gpt)
    except ConfigError as e:
        raise r.error(key, f"does not convert: {e}") from e
    return config


def _check_fused_qkv(r: _Reader, key: str, picked: list[str], selects: Callable[[str], bool]) -> None:
    """Our c_attn fuses q, k and v: a filter must select all three of a layer's projections or none."""
    for name in picked:
        spellings = cerebras_names(name)
        if len(spellings) == 3:
            hit = [s.split(".")[-2] for s in spellings if selects(s) or selects(f"model.{s}")]
            if len(hit) != 3:
                raise r.error(
                    key,
                    f"selects {', '.join(hit)} but not all of proj_q/k/v_dense_layer in "
                    f"{spellings[0].rsplit('.', 3)[0]}; our c_attn fuses q, k and v into one weight, so they are "
                    "sparse together or not at all",
                )


def _sparsity_config(groups: list[dict]) -> SparsityConfig:
    if not groups:
        return SparsityConfig()
    if len(groups) == 1:
        return SparsityConfig(**groups[0])
    return SparsityConfig(groups=[SparsityGroupConfig(**g) for g in groups])


# ---- writing ----------------------------------------------------------------------------------------------------
def to_params(recipe: CerebrasRecipe) -> dict:
    """A Cerebras Model Zoo 2.2 params dict (runconfig style) for `recipe`; `read_params` reads it back."""
    m, o, t = recipe.model, recipe.optim, recipe.train
    family = FAMILIES[m.family]
    model = {"name": family.names[0], **{theirs: getattr(m, ours) for theirs, ours in MODEL_KEYS.items()}}
    model.update(  # the options whose Model Zoo default differs from ours, and the position embedding's kind
        (k, v) for k, v, _ in family.fixed if k == "position_embedding_type" or MODELZOO_DEFAULTS[k] != v
    )
    model.update(family.write(m))
    model.update(
        initializer={
            "name": "truncated_normal",
            "mean": 0.0,
            "std": m.init_std,
            "a": -2 * m.init_std,
            "b": 2 * m.init_std,
        },
    )
    optimizer: dict[str, Any] = {
        "optimizer_type": "AdamW",
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "correct_bias": True,
        "learning_rate": _lr_phases(o, t.max_steps),
    }
    if math.isfinite(o.grad_clip):
        optimizer["max_gradient_norm"] = o.grad_clip
    params = {
        "train_input": {
            "batch_size": t.batch_size,
            "micro_batch_size": t.micro_batch_size,
            "max_sequence_length": recipe.seq_len,
        },
        "model": model,
        "optimizer": optimizer,
        "runconfig": {"max_steps": t.max_steps},
    }
    if recipe.sparsity.enabled:
        params["sparsity"] = _sparsity_block(recipe.sparsity, m)
    return params


def _lr_phases(o: OptimConfig, max_steps: int) -> float | list[dict]:
    phases = []
    if o.warmup_steps:
        phases.append(
            {
                "scheduler": "Linear",
                "initial_learning_rate": 0.0,
                "end_learning_rate": o.lr,
                "total_iters": o.warmup_steps,
            }
        )
    if o.decay == "constant":
        if not phases:
            return o.lr
        phases.append({"scheduler": "Constant", "learning_rate": o.lr})
        return phases
    phases.append(
        {
            "scheduler": "CosineDecay" if o.decay == "cosine" else "Linear",
            "initial_learning_rate": o.lr,
            "end_learning_rate": float(f"{o.lr * o.min_lr_ratio:.12g}"),
            "total_iters": max_steps - o.warmup_steps,
        }
    )
    return phases


def _sparsity_block(config: SparsityConfig, model: ModelConfig) -> dict | list[dict]:
    with torch.device("meta"):
        gpt = build_model(model)
    universe = [s for n in dict(gpt.named_parameters()) for s in cerebras_names(n)]
    blocks = []
    for plan in plan_groups(config, gpt):
        g = plan.config
        for key, value, allowed in (("distribution", g.distribution, "uniform"), ("pattern", g.pattern, None)):
            if value != allowed:
                raise ConfigError(f"{plan.key}.{key}", f"{value!r} has no Cerebras Model Zoo equivalent", [allowed])
        block: dict[str, Any] = {
            "sparsity": g.sparsity,
            "init_method": "from_zeros" if g.init_method == "from_weights" else g.init_method,
            "algorithm": g.algorithm,
        }
        block.update({k: getattr(g, k) for k in ("update", "drop_fraction") if getattr(g, k) is not None})
        if g.filters is not None or len(config.group_configs()) > 1:  # absent: the same default on both sides
            theirs = [s for n in plan.names for s in cerebras_names(n)]
            same = (
                g.filters is not None and [s for s in universe if any(fnmatchcase(s, p) for p in g.filters)] == theirs
            )
            block["param_filter"] = g.filters if same else [f"*{p}" for p in compact_globs(theirs, universe)]
        blocks.append(block)
    return blocks[0] if len(blocks) == 1 else blocks


def write_params(recipe: CerebrasRecipe, path: str | Path) -> Path:
    """Write `recipe` as a Cerebras Model Zoo params YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_params(recipe), sort_keys=False))
    return path


def write_hydra_options(recipe: CerebrasRecipe, conf_dir: str | Path) -> list[str]:
    """Write `recipe` as options of our `model`, `sparsity` and `optim` config groups under `conf_dir`.

    Returns the overrides that select them (with `hydra.searchpath`) and set the loop and sequence length, e.g.
    `modelzoo pretrain <overrides>`.
    """
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir).resolve()
    name = recipe.model.name
    options = (
        ("model", model_option_yaml(recipe.model)),
        ("sparsity", OmegaConf.to_yaml(OmegaConf.structured(recipe.sparsity))),
        ("optim", OmegaConf.to_yaml(OmegaConf.structured(recipe.optim))),
    )
    for group, text in options:
        (conf_dir / group).mkdir(parents=True, exist_ok=True)
        (conf_dir / group / f"{name}.yaml").write_text(text)
    t = recipe.train
    return [
        f"hydra.searchpath=[file://{conf_dir}]",
        f"model={name}",
        f"sparsity={name}",
        f"optim={name}",
        f"task.max_steps={t.max_steps}",
        f"task.batch_size={t.batch_size}",
        f"task.micro_batch_size={t.micro_batch_size}",
        f"data.seq_len={recipe.seq_len}",
    ]

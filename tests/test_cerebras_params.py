"""Cerebras Model Zoo params YAMLs <-> our configs, on real Cerebras/modelzoo files in tests/data/cerebras_modelzoo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from modelzoo.backends.cerebras.params import compact_globs, read_params, to_params, write_params
from modelzoo.config import load_config, to_object
from modelzoo.errors import ConfigError
from modelzoo.models.llama import RopeScaling
from modelzoo.models.registry import ModelConfig, build_model
from modelzoo.report import parameter_counts
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plan import plan_groups

DATA = Path(__file__).parent / "data" / "cerebras_modelzoo"
SPARSE_125M = [
    "gpt3_125m_static75_v20.yaml",
    "gpt3_125m_rigl75_v20.yaml",
    "gpt3_125m_rigl75_v22.yaml",
    "gpt3_125m_static75_trainer.yaml",
]
SHAPE = ("n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size")
# Real files we refuse as a whole (the Llama 3.1 8B recipe trains with Adam, L2 weight decay): tested below.
REFUSED = {"llama3p1_8b_msl128k_trainer.yaml"}


def planned(sparsity: SparsityConfig, model: ModelConfig) -> list[tuple[str, ...]]:
    with torch.device("meta"):
        return [plan.names for plan in plan_groups(sparsity, build_model(model))]


def block_matrices(n_layer: int) -> tuple[str, ...]:
    kinds = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return tuple(f"transformer.h.{i}.{k}.weight" for i in range(n_layer) for k in kinds)


def edited(tmp_path: Path, source: str, edit) -> Path:
    """A copy of a real fixture with one change applied to its parsed YAML."""
    raw = yaml.safe_load((DATA / source).read_text())
    edit(raw)
    path = tmp_path / source
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", ["gpt3_xl_runconfig.yaml", "gpt3_xl_trainer.yaml"])
def test_gpt3_xl_maps_to_our_xl_size_and_recipe(name: str) -> None:
    recipe = read_params(DATA / name)
    ours = to_object(load_config(["model=xl"])).model
    assert {k: getattr(recipe.model, k) for k in SHAPE} == {k: getattr(ours, k) for k in SHAPE}
    assert f"{parameter_counts(recipe.model)['block matrices'] / 1e6:,.1f}M" == "1,208.0M"
    assert recipe.model.activation == "gelu" and recipe.model.dropout == 0.0
    o = recipe.optim
    assert (o.lr, o.warmup_steps, o.decay, o.min_lr_ratio) == (2e-4, 346, "cosine", pytest.approx(0.1))
    assert (o.betas, o.eps, o.weight_decay, o.grad_clip) == ([0.9, 0.95], 1e-8, 0.1, 1.0)
    assert (recipe.train.max_steps, recipe.train.batch_size, recipe.seq_len) == (24334, 528, 2048)
    assert not recipe.sparsity.enabled


def test_gpt2_small_linear_decay_to_zero_and_dropout() -> None:
    recipe = read_params(DATA / "gpt2_small_runconfig.yaml")
    assert {k: getattr(recipe.model, k) for k in SHAPE} == dict(
        n_layer=12, n_embd=768, n_head=12, n_inner=3072, n_positions=2048, vocab_size=50257
    )
    assert recipe.model.dropout == 0.1
    o = recipe.optim
    assert (o.lr, o.warmup_steps, o.decay, o.min_lr_ratio, o.weight_decay) == (6e-4, 1600, "linear", 0.0, 0.01)
    assert (recipe.train.max_steps, recipe.train.batch_size) == (151600, 112)


@pytest.mark.parametrize("name", SPARSE_125M)
def test_every_sparsity_dialect_selects_the_attention_and_mlp_matrices(name: str) -> None:
    recipe = read_params(DATA / name)
    assert planned(recipe.sparsity, recipe.model) == [block_matrices(12)]
    assert recipe.sparsity.sparsity == 0.75 and recipe.sparsity.init_method == "random"
    if "rigl" in name:  # 2.0 `type` + `schedule` and 2.2 `algorithm` + `update` mean the same
        assert recipe.sparsity.algorithm == "rigl"
        assert recipe.sparsity.update == {"freq": 100, "stop": 3584}
        assert recipe.sparsity.drop_fraction == {"type": "cosine", "init": 0.3, "half_period": 3584}
    else:
        assert recipe.sparsity.algorithm == "static"


def test_a_2_2_glob_filter_is_kept_as_written() -> None:
    recipe = read_params(DATA / "gpt3_125m_rigl75_v22.yaml")
    assert recipe.sparsity.param_filter == [
        "*proj_[qkv]_dense_layer.weight",
        "*proj_output_dense_layer.weight",
        "*linear_layer.weight",
    ]


def test_regex_dict_becomes_groups_with_per_pattern_overrides(tmp_path: Path) -> None:
    def edit(raw: dict) -> None:
        raw["sparsity"]["param_name_patterns"] = {r".*proj_[qkv]_dense_layer\.weight": {"sparsity": 0.5}, "ffn.0": None}

    recipe = read_params(edited(tmp_path, "gpt3_125m_static75_v20.yaml", edit))
    groups = recipe.sparsity.groups
    assert [g.sparsity for g in groups] == [0.5, 0.75]
    assert planned(recipe.sparsity, recipe.model) == [
        tuple(f"transformer.h.{i}.attn.c_attn.weight" for i in range(12)),
        # "ffn.0" (re.search) also matches the biases, as it would in cstorch
        tuple(f"transformer.h.{i}.mlp.c_fc.{p}" for i in range(12) for p in ("weight", "bias")),
    ]


def test_regex_on_some_layers_converts_to_exact_globs(tmp_path: Path) -> None:
    def edit(raw: dict) -> None:
        raw["sparsity"]["param_name_patterns"] = r"layers\.(0|11)\..*linear_layer\.weight$"

    recipe = read_params(edited(tmp_path, "gpt3_125m_static75_v20.yaml", edit))
    assert planned(recipe.sparsity, recipe.model) == [
        tuple(f"transformer.h.{i}.mlp.{k}.weight" for i in (0, 11) for k in ("c_fc", "c_proj"))
    ]


def test_compact_globs_use_wildcards_only_where_every_block_is_selected() -> None:
    universe = [f"h.{i}.{k}.weight" for i in range(3) for k in ("a", "b")]
    assert compact_globs([f"h.{i}.a.weight" for i in range(3)], universe) == ["h.*.a.weight"]
    assert compact_globs(["h.0.a.weight", "h.2.a.weight"], universe) == ["h.0.a.weight", "h.2.a.weight"]


@pytest.mark.parametrize(
    ("section", "key", "value", "says"),
    [
        ("model", "position_embedding_type", "rotary", "model.position_embedding_type: 'rotary' cannot be imported"),
        ("model", "share_embedding_weights", False, "model.share_embedding_weights: False cannot be imported"),
        ("model", "attention_dropout_rate", 0.1, "differ; our GPT has one dropout rate"),
        ("model", "use_swiglu", True, "model.use_swiglu: is not understood"),
        ("optimizer", "optimizer_type", "SGD", "optimizer.optimizer_type: 'SGD' cannot be imported"),
        ("sparsity", "param_name_patterns", "nothing_matches_this", "selects no parameter"),
        ("sparsity", "param_name_patterns", r"proj_q_dense_layer\.weight", "our c_attn fuses q, k and v"),
        ("sparsity", "type", "magic", "sparsity: does not convert: sparsity.algorithm: unknown 'magic'"),
        ("sparsity", "balance_in_groups", 2, "sparsity.balance_in_groups: cannot be imported"),
    ],
)
def test_what_we_cannot_represent_is_refused_naming_file_and_key(tmp_path, section, key, value, says) -> None:
    def edit(raw: dict) -> None:
        raw[section][key] = value

    path = edited(tmp_path, "gpt3_125m_static75_v20.yaml", edit)
    with pytest.raises(ConfigError, match=r"gpt3_125m_static75_v20\.yaml: ") as error:
        read_params(path)
    assert says in str(error.value)


def test_a_schedule_that_ends_before_max_steps_is_refused(tmp_path: Path) -> None:
    def edit(raw: dict) -> None:
        raw["runconfig"]["max_steps"] = 5000

    with pytest.raises(ConfigError, match="phases last 4778 steps but max_steps is 5000"):
        read_params(edited(tmp_path, "gpt3_125m_static75_v20.yaml", edit))


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.yaml") if p.name not in REFUSED))
def test_written_params_read_back_to_the_same_configs(tmp_path: Path, name: str) -> None:
    recipe = read_params(DATA / name)
    again = read_params(write_params(recipe, tmp_path / name))
    assert (again.model, again.optim, again.train, again.seq_len, again.sparsity) == (
        recipe.model,
        recipe.optim,
        recipe.train,
        recipe.seq_len,
        recipe.sparsity,
    )


def test_our_name_filters_are_written_as_cerebras_globs(tmp_path: Path) -> None:
    recipe = read_params(DATA / "gpt3_125m_static75_v20.yaml")
    recipe.sparsity = SparsityConfig(
        sparsity=0.5, param_filter=["*mlp.c_fc.weight", "transformer.h.3.attn.c_attn.weight"]
    )
    written = to_params(recipe)["sparsity"]["param_filter"]
    assert written == [
        "*transformer_decoder.layers.*.ffn.ffn.0.linear_layer.weight",
        *(f"*transformer_decoder.layers.3.self_attn.proj_{x}_dense_layer.weight" for x in "qkv"),
    ]
    again = read_params(write_params(recipe, tmp_path / "p.yaml"))
    assert planned(again.sparsity, again.model) == planned(recipe.sparsity, recipe.model)


def test_writing_refuses_what_cerebras_cannot_express() -> None:
    recipe = read_params(DATA / "gpt3_125m_static75_v20.yaml")
    recipe.sparsity = SparsityConfig(sparsity=0.75, distribution="erk")
    with pytest.raises(ConfigError, match=r"sparsity\.distribution: 'erk' has no Cerebras Model Zoo equivalent"):
        to_params(recipe)


ATTN = tuple(f"transformer.h.{i}.attn.c_attn.weight" for i in range(12))
MLP = tuple(f"transformer.h.{i}.mlp.{k}.weight" for i in range(12) for k in ("c_fc", "c_proj"))


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (  # 2.0 GMP: sparsity_schedule [[step, level], ...] -> update steps and levels, one per update
            {
                "type": "gmp",
                "sparsity_schedule": [[1, 0.3], [6, 0.5], [8, 0.7]],
                "param_name_patterns": r"linear_layer\.weight",
            },
            [(MLP, {"algorithm": "gmp", "update": {"steps": [1, 6, 8]}, "sparsity": [0.3, 0.5, 0.7]})],
        ),
        (  # 2.2+: a list of groups, glob filters, `schedule` as an alias of `sparsity`
            [
                {"param_filter": "*proj_[qkv]_dense_layer.weight", "sparsity": 0.5},
                {
                    "algorithm": "gmp",
                    "schedule": {"type": "linear", "init": 0.0, "slope": 0.001},
                    "update": {"freq": 10},
                },
            ],
            [
                (ATTN, {"sparsity": 0.5}),
                (  # the second group has the default filter minus what the first took
                    tuple(
                        f"transformer.h.{i}.{k}.weight"
                        for i in range(12)
                        for k in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                    ),
                    {"algorithm": "gmp", "sparsity": {"type": "linear", "init": 0.0, "slope": 0.001}},
                ),
            ],
        ),
        (  # pydantic-style {groups: [...]} with `params` sub-blocks
            {"groups": [{"params": {"sparsity": 0.9, "param_filter": "*ffn.ffn.*.linear_layer.weight"}}]},
            [(MLP, {"sparsity": 0.9})],
        ),
        (  # 1.x sideband: static, the mask comes from the checkpoint's NaN weights
            {"type": "sideband", "sparsity": 0.5},
            [(block_matrices(12), {"algorithm": "static", "init_method": "from_zeros"})],
        ),
    ],
)
def test_more_sparsity_dialects(tmp_path: Path, block, expected) -> None:
    def edit(raw: dict) -> None:
        raw["sparsity"] = block

    recipe = read_params(edited(tmp_path, "gpt3_125m_static75_v20.yaml", edit))
    groups = [g for _, g in recipe.sparsity.group_configs()]
    plans = planned(recipe.sparsity, recipe.model)
    assert len(plans) == len(expected)
    for plan, group, (names, fields) in zip(plans, groups, expected, strict=True):
        assert sorted(plan) == sorted(names)
        assert {k: getattr(group, k) for k in fields} == fields


def test_a_group_after_a_default_filter_group_gets_only_what_is_left(tmp_path: Path) -> None:
    def edit(raw: dict) -> None:
        raw["sparsity"] = [{"sparsity": 0.5}, {"sparsity": 0.9, "param_filter": ["*linear_layer.weight", "*norm1.*"]}]

    recipe = read_params(edited(tmp_path, "gpt3_125m_rigl75_v22.yaml", edit))
    ln_1 = tuple(f"transformer.h.{i}.ln_1.{p}" for i in range(12) for p in ("weight", "bias"))
    assert planned(recipe.sparsity, recipe.model) == [block_matrices(12), ln_1]
    assert recipe.sparsity.groups[1].param_filter == ["transformer.h.*.ln_1.weight", "transformer.h.*.ln_1.bias"]

    def edit(raw: dict) -> None:
        raw["sparsity"] = [{"sparsity": 0.5}, {"sparsity": 0.9, "param_filter": "*linear_layer.weight"}]

    with pytest.raises(ConfigError, match="selects no parameter of this model that an earlier group has not taken"):
        read_params(edited(tmp_path, "gpt3_125m_rigl75_v22.yaml", edit))


# ---- Llama -------------------------------------------------------------------------------------------------------
LLAMA_TINY = "llama_tiny_gqa_llama3_static50.yaml"
# Every field of a LlamaConfig but the name: what a params file must reproduce of a named size.
LLAMA_FIELDS = (*SHAPE, "n_kv_head", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "init_std")


def llama_edit(tmp_path: Path, key: str, value: object, source: str = LLAMA_TINY) -> Path:
    """A copy of a trainer-style Llama fixture with one model key set (dotted: nested; None: removed)."""

    def edit(raw: dict) -> None:
        *parents, leaf = key.split(".")
        block = raw["trainer"]["init"]["model"]
        for part in parents:
            block = block[part]
        if value is None:
            del block[leaf]
        else:
            block[leaf] = value

    return edited(tmp_path, source, edit)


def same_size(recipe_model: object, size: str) -> None:
    ours = to_object(load_config([f"model={size}"])).model
    assert {k: getattr(recipe_model, k) for k in LLAMA_FIELDS} == {k: getattr(ours, k) for k in LLAMA_FIELDS}
    assert parameter_counts(recipe_model) == parameter_counts(ours)


def test_llama2_7b_maps_to_our_llama2_7b_size_and_recipe() -> None:
    recipe = read_params(DATA / "llama2_7b_trainer.yaml")
    same_size(recipe.model, "llama2_7b")
    assert f"{parameter_counts(recipe.model)['total'] / 1e6:,.1f}M" == "6,738.4M"  # conf/model/llama2_7b.yaml
    o = recipe.optim
    assert (o.lr, o.warmup_steps, o.decay, o.min_lr_ratio) == (3e-4, 2000, "cosine", pytest.approx(0.1))
    assert (o.betas, o.eps, o.weight_decay, o.grad_clip) == ([0.9, 0.95], 1e-5, 0.1, 1.0)
    assert (recipe.train.max_steps, recipe.train.batch_size, recipe.seq_len) == (476837, 1024, 4096)
    assert not recipe.sparsity.enabled


def test_llama3p1_8b_maps_to_our_llama3_8b_size_once_its_adam_is_adamw(tmp_path: Path) -> None:
    name = "llama3p1_8b_msl128k_trainer.yaml"
    with pytest.raises(ConfigError, match=r"trainer\.init\.optimizer\.Adam: 'Adam' cannot be imported"):
        read_params(DATA / name)

    def edit(raw: dict) -> None:
        optimizer = raw["trainer"]["init"]["optimizer"]
        optimizer["AdamW"] = optimizer.pop("Adam")

    recipe = read_params(edited(tmp_path, name, edit))
    same_size(recipe.model, "llama3_8b")  # GQA 32/8 heads, rope_theta 5e5, llama3 scaling x8 from 8192
    assert f"{parameter_counts(recipe.model)['total'] / 1e6:,.1f}M" == "8,030.3M"  # conf/model/llama3_8b.yaml
    o = recipe.optim  # its one LinearLR 0 -> 3e-4 over all 4768 steps: a warm-up that lasts the run
    assert (o.lr, o.warmup_steps, o.decay, recipe.train.max_steps) == (3e-4, 4768, "constant", 4768)
    assert (recipe.train.batch_size, recipe.seq_len) == (4, 131072)


def test_llama_tiny_gqa_llama3_scaling_and_sparsity_in_their_names() -> None:
    recipe = read_params(DATA / LLAMA_TINY)
    m = recipe.model
    assert (m.family, m.n_head, m.n_kv_head, m.tie_word_embeddings) == ("llama", 4, 2, False)
    assert m.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    assert recipe.sparsity.param_filter == [  # kept as written: it selects the same tensors through the aliases
        "*proj_[qkv]_dense_layer.weight",
        "*ffn.ffn.0.linear_layer_for_glu.weight",
        "*ffn.ffn.0.linear_layer.weight",
    ]
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    assert planned(recipe.sparsity, m) == [tuple(f"model.layers.{i}.{k}.weight" for i in range(4) for k in kinds)]
    assert (recipe.train.max_steps, recipe.train.batch_size, recipe.train.micro_batch_size) == (100, 8, 4)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("norm_type", "layernorm", "model.norm_type: 'layernorm' cannot be imported: our blocks use RMSNorm"),
        ("norm_type", None, "model.norm_type: absent, so the Model Zoo default 'layernorm' applies, which cannot"),
        ("nonlinearity", "geglu", "model.nonlinearity: 'geglu' cannot be imported: our MLP is a SwiGLU"),
        ("use_ffn_bias", True, "model.use_ffn_bias: True cannot be imported: our MLP layers have no biases"),
        ("dropout_rate", 0.1, "model.dropout_rate: 0.1 cannot be imported: our Llama has no dropout"),
        ("rotary_dim", 8, "model.rotary_dim: 8 cannot be imported: our Llama rotates whole heads (allowed: 32)"),
        ("rotary_dim", None, "model.rotary_dim: is missing, so the Model Zoo rotates a quarter of each head"),
        ("pos_scaling_type", "yarn", "model.pos_scaling_type: 'yarn' with pos_scaling_factor 8.0 cannot be imported"),
        ("pos_scaling_extra_args.beta_fast", 32, "pos_scaling_extra_args.beta_fast: is not an argument of llama3"),
        ("attention_module", "aiayn_attention", "num_kv_groups: needs attention_module: multiquery_attention"),
        ("extra_attention_params.num_kv_groups", 3, "num_kv_groups: 3 does not divide num_heads=4"),
        ("extra_attention_params.attention_kernel", "flash", "extra_attention_params.attention_kernel: cannot be"),
        ("attention_sliding_window_length", 64, "model.attention_sliding_window_length: is not understood"),
        ("name", "mistral", "model.name: 'mistral' is not a model we have"),
    ],
)
def test_what_our_llama_cannot_represent_is_refused_naming_file_and_key(tmp_path, key, value, says) -> None:
    with pytest.raises(ConfigError, match=rf"{LLAMA_TINY}: trainer\.init\.") as error:
        read_params(llama_edit(tmp_path, key, value))
    assert says in str(error.value)


def test_llama_defaults_a_file_may_leave_out(tmp_path: Path) -> None:
    """Absent keys take the Model Zoo's defaults: tied head, theta 1e4, no scaling, one key/value group (MQA)."""
    left_out = ("share_embedding_weights", "rope_theta", "pos_scaling_type", "pos_scaling_factor")

    def edit(raw: dict) -> None:
        model = raw["trainer"]["init"]["model"]
        for key in (*left_out, "pos_scaling_extra_args", "extra_attention_params"):
            del model[key]

    m = read_params(edited(tmp_path, LLAMA_TINY, edit)).model
    assert (m.tie_word_embeddings, m.rope_theta, m.rope_scaling, m.n_kv_head) == (True, 10000.0, None, 1)


def test_our_llama_names_are_written_as_their_globs(tmp_path: Path) -> None:
    recipe = read_params(DATA / LLAMA_TINY)
    recipe.sparsity = SparsityConfig(
        sparsity=0.5, param_filter=["*mlp.gate_proj.weight", "model.layers.1.self_attn.k_proj.weight", "lm_head.*"]
    )
    assert to_params(recipe)["sparsity"]["param_filter"] == [
        "*transformer_decoder.layers.*.ffn.ffn.*.linear_layer_for_glu.weight",  # every index a wildcard: exact
        "*transformer_decoder.layers.1.self_attn.proj_k_dense_layer.weight",
        "*lm_head.weight",
    ]
    again = read_params(write_params(recipe, tmp_path / "p.yaml"))
    assert planned(again.sparsity, again.model) == planned(recipe.sparsity, recipe.model)

"""Cerebras Model Zoo params YAMLs <-> our configs, on real Cerebras/modelzoo files in tests/data/cerebras_modelzoo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from modelzoo.backends.cerebras.params import compact_globs, read_params, to_params, write_params
from modelzoo.config import load_config, to_object
from modelzoo.errors import ConfigError
from modelzoo.models.gpt import GPT, GPTConfig
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


def planned(sparsity: SparsityConfig, model: GPTConfig) -> list[tuple[str, ...]]:
    with torch.device("meta"):
        return [plan.names for plan in plan_groups(sparsity, GPT(model))]


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


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.yaml")))
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

"""Dynamic and structured sparsity: schedules, GMP / SET / RigL mask updates, N:M, groups, ERK, config keys.

`test_matches_an_independent_reference` re-implements the three algorithms in plain torch from the cstorch
rules (no library code) and checks that masks, weights and achieved sparsity agree exactly after N steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelzoo.config import load_config, to_object
from modelzoo.config.train import OptimConfig
from modelzoo.errors import ConfigError
from modelzoo.flops import flop_report
from modelzoo.models.gpt import GPT
from modelzoo.optim import build_optimizer
from modelzoo.sparsity.config import NMPattern, SparsityConfig, SparsityGroupConfig
from modelzoo.sparsity.distribution import distribute
from modelzoo.sparsity.init import checkerboard_mask
from modelzoo.sparsity.plan import plan_groups, run_levels
from modelzoo.sparsity.plugin import MaskedSparsity
from modelzoo.sparsity.schedules import make_schedule, make_update_schedule
from modelzoo.validate import validate
from tests.conftest import GMP_75_AVERAGE

BLOCK = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def kept(count: int, fraction: float) -> int:
    """cstorch's sizing rule, `((1 - fraction) * count).int()` in float32."""
    return int((1 - f32(fraction)) * f32(float(count)))


# ---- schedules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "formula"),
    [
        (0.6, lambda t: 0.6),
        ({"type": "constant", "value": 0.4}, lambda t: 0.4),
        ({"type": "linear", "init": 0.1, "slope": 0.002}, lambda t: 0.1 + t * 0.002),
        ({"type": "exp", "init": 0.0, "gamma": -0.01, "final": 0.8}, lambda t: 0.8 - 0.8 * math.exp(-0.01 * t)),
        ({"type": "power", "init": 0.5, "beta": 0.99}, lambda t: 0.5 * 0.99**t),
        (
            {"type": "cosine", "init": 0.3, "half_period": 100, "minimum": 0.1},
            lambda t: 0.2 + 0.1 * math.cos(t * math.pi / 100),
        ),
        (
            {"type": "cosine", "init": 0.0, "half_period": 300, "minimum": 0.75},
            lambda t: 0.375 - 0.375 * math.cos(t * math.pi / 300),
        ),
    ],
)
def test_schedules_equal_their_formulas(spec: object, formula) -> None:
    schedule = make_schedule(spec, "sparsity.sparsity")
    for step in (0, 1, 7, 100, 150, 300):
        assert schedule(step) == pytest.approx(formula(step), rel=1e-5, abs=1e-7)  # float32, as cstorch


def test_cycling_advances_once_per_update_step() -> None:
    schedule = make_schedule([0.5, 0.6, 0.7], "sparsity.sparsity")
    seen = []
    for is_update in (False, True, False, True, True, True):
        seen.append(schedule(0))
        schedule.advance(is_update)
    assert seen == pytest.approx([0.5, 0.5, 0.6, 0.6, 0.7, 0.5])
    assert schedule.state_dict() == {"index": 1}


def test_update_schedules() -> None:
    freq = make_update_schedule({"freq": 100, "start": 50, "stop": 3584}, "sparsity.update")
    assert [s for s in range(400) if freq(s)] == [50, 150, 250, 350]
    assert freq(3550) and not freq(3560) and not freq(3650) and freq.last_step == 3550
    every = make_update_schedule(None, "sparsity.update")
    assert all(every(s) for s in range(5))
    steps = make_update_schedule({"steps": [3, 10]}, "sparsity.update")
    assert [s for s in range(20) if steps(s)] == [3, 10] and steps.last_step == 10


# ---- config keys and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "key", "hint"),
    [
        (SparsityConfig(sparsity={"type": "cosin", "init": 0.3}, algorithm="gmp"), "sparsity.sparsity.type", "cosine"),
        (
            SparsityConfig(sparsity={"type": "cosine", "init": 0.3}, algorithm="gmp"),
            "sparsity.sparsity.half_period",
            "",
        ),
        (
            SparsityConfig(sparsity={"type": "linear", "init": 0, "slope": 1, "x": 1}, algorithm="gmp"),
            "sparsity.sparsity.x",
            "",
        ),
        (SparsityConfig(sparsity=[0.5, 1.5], algorithm="set"), "sparsity.sparsity.values[1]", "outside [0, 1)"),
        (SparsityConfig(sparsity={"type": "linear", "init": 0, "slope": 1}), "sparsity.sparsity", "gmp, set, rigl"),
        (SparsityConfig(sparsity=0.5, algorithm="gmp"), "sparsity.sparsity", "static"),
        (SparsityConfig(sparsity=0.5, update={"freq": 10}), "sparsity.update", "static masks never update"),
        (SparsityConfig(sparsity=0.5, algorithm="rigl", update={"freq": 0}), "sparsity.update.freq", ">= 1"),
        (SparsityConfig(sparsity=0.5, algorithm="rigl", update={"every": 3}), "sparsity.update.every", "freq"),
        (SparsityConfig(sparsity=0.5, algorithm="set", update={"steps": []}), "sparsity.update.steps", "non-empty"),
        (
            SparsityConfig(sparsity=[0.5, 0.6], algorithm="gmp", drop_fraction=0.2),
            "sparsity.drop_fraction",
            "set, rigl",
        ),
        (SparsityConfig(sparsity=0.5, algorithm="rigl", drop_fraction=1.2), "sparsity.drop_fraction", "[0, 1]"),
        (SparsityConfig(sparsity=0.5, distribution="normal"), "sparsity.distribution", "uniform, erk"),
        (SparsityConfig(pattern=NMPattern(4, 4)), "sparsity.pattern", "0 < n < m"),
        (SparsityConfig(pattern=NMPattern(2, 4), algorithm="rigl"), "sparsity.algorithm", "static"),
        (SparsityConfig(sparsity=0.75, pattern=NMPattern(2, 4)), "sparsity.sparsity", "1 - n/m"),
        (SparsityConfig(groups=[]), "sparsity.groups", "at least one"),
        (
            SparsityConfig(groups=[SparsityGroupConfig(sparsity=0.5), SparsityGroupConfig()]),
            "sparsity.groups[1].sparsity",
            "",
        ),
        (
            SparsityConfig(
                groups=[SparsityGroupConfig(sparsity=0.5), SparsityGroupConfig(sparsity=0.5, init_method="x")]
            ),
            "sparsity.groups[1].init_method",
            "from_weights",
        ),
        (SparsityConfig(sparsity=0.5, groups=[SparsityGroupConfig(sparsity=0.5)]), "sparsity.sparsity", "groups[i]"),
    ],
)
def test_invalid_sparsity_configs_name_the_key(config: SparsityConfig, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.key == key
    assert hint in str(info.value)


GMP_LINEAR = ["sparsity=dense", "sparsity.algorithm=gmp", "sparsity.update={freq: 10}"]


@pytest.mark.parametrize(
    ("overrides", "key", "hint"),
    [
        (["sparsity=gmp_75", "sparsity.sparsity.minimum=1.0"], "sparsity.sparsity", "reaches 1 at step 300"),
        ([*GMP_LINEAR, "sparsity.sparsity={type: linear, init: 0.0, slope: 0.01}"], "sparsity.sparsity", "step 100"),
        (
            [*GMP_LINEAR, "sparsity.sparsity={type: linear, init: 0.5, slope: -0.01}"],
            "sparsity.sparsity",
            "reaches -0.1 at step 60",
        ),
        (["sparsity.sparsity=0.99999"], "sparsity.sparsity", "at step 0 keeps no weight of transformer.h.0"),
        (
            [
                *GMP_LINEAR,
                "sparsity.algorithm=rigl",
                "sparsity.sparsity=0.75",
                "sparsity.drop_fraction={type: linear, init: 0.3, slope: 0.01}",
            ],
            "sparsity.drop_fraction",
            "reaches 1.1 at step 80",  # 1.0 at step 70 drops every connection, allowed
        ),
        (
            [
                "sparsity=dense",
                "sparsity.groups=[{param_filter: '*attn*', sparsity: 0.5}, "
                "{sparsity: [0.5, 0.99999], algorithm: set, update: {freq: 10}}]",
            ],
            "sparsity.groups[1].sparsity",
            "0.99999 at step 10 keeps no weight",
        ),
        ([*GMP_LINEAR, "sparsity.sparsity={type: exp, init: 0.0, gamma: 0.1}"], "sparsity.sparsity.gamma", "<= 0"),
        ([*GMP_LINEAR, "sparsity.sparsity={type: power, init: 0.5, beta: -0.5}"], "sparsity.sparsity.beta", "positive"),
        (
            [*GMP_LINEAR, "sparsity.sparsity={type: linear, init: 0.5, slope: inf}"],
            "sparsity.sparsity.slope",
            "finite",
        ),
    ],
)
def test_schedules_are_checked_over_the_whole_run(overrides: list[str], key: str, hint: str) -> None:
    """Every mask draw of the run (steps 0..task.max_steps=400) must stay in [0, 1) and keep a weight of each
    tensor: the error names the key and the first step that does not."""
    with pytest.raises(ConfigError) as info:
        validate(to_object(load_config(["backend=masked_dense", *overrides])))
    assert info.value.key == key
    assert hint in str(info.value)


def test_a_schedule_that_leaves_the_range_after_the_run_is_accepted() -> None:
    """A linear schedule reaching 1 at step 100 is fine for a run of 99 steps, and one without `update.stop`
    is bounded by the run, not by cstorch's 100,000-step annotation horizon."""
    linear = ["sparsity=dense", "sparsity.algorithm=gmp", "sparsity.sparsity={type: linear, init: 0.0, slope: 0.01}"]
    every_10 = [*linear, "backend=masked_dense", "sparsity.update={freq: 10}"]
    validate(to_object(load_config([*every_10, "task.max_steps=99"])))
    with pytest.raises(ConfigError, match="step 100"):
        validate(to_object(load_config([*every_10, "task.max_steps=100"])))
    validate(to_object(load_config([*linear, "backend=masked_dense", "sparsity.update={freq: 10, stop: 100}"])))


def test_groups_and_patterns_compose_with_hydra_overrides() -> None:
    # masked_dense: N:M is ours (backend=auto would pick cerebras in the Cerebras venv, which refuses N:M)
    cfg = to_object(
        load_config(["sparsity=nm_2_4", "sparsity.pattern.n=4", "sparsity.pattern.m=8", "backend=masked_dense"])
    )
    validate(cfg)
    assert cfg.sparsity.summary() == {"algorithm": "static", "target_sparsity": 0.5, "pattern": "4:8"}
    overrides = [
        "sparsity=dense",
        "sparsity.groups=[{param_filter: '*attn*', sparsity: 0.5}, {sparsity: 0.75, algorithm: rigl}]",
    ]
    cfg = to_object(load_config(overrides))
    validate(cfg)
    assert [g.algorithm for g in cfg.sparsity.groups] == ["static", "rigl"]
    assert cfg.sparsity.algorithms == ["static", "rigl"]
    with pytest.raises(ConfigError) as info:
        validate(to_object(load_config(["sparsity=dense", "sparsity.groups=[{sparsity: 0.5}, {sparsity: 0.75}]"])))
    assert info.value.key == "sparsity.groups[1].param_filter" and "earlier group" in str(info.value)
    with pytest.raises(ConfigError) as info:
        to_object(load_config(["sparsity=dense", "sparsity.groups=[{sparsity: 0.5}]", "+sparsity.groups.0.foo=1"]))
    assert info.value.key == "sparsity.groups[0].foo"


def test_cerebras_rigl_recipe_parses_and_selects_attention_and_mlp_weights(tiny_model: GPT) -> None:
    cfg = to_object(load_config(["sparsity=cerebras_gpt3_125m_rigl75"]))
    validate(cfg)
    s = cfg.sparsity
    assert (s.sparsity, s.init_method, s.algorithm) == (0.75, "random", "rigl")
    assert s.drop_fraction == {"type": "cosine", "init": 0.3, "half_period": 3584}
    assert s.update == {"freq": 100, "stop": 3584}
    assert s.param_filter == [
        "*proj_[qkv]_dense_layer.weight",
        "*proj_output_dense_layer.weight",
        "*linear_layer.weight",
    ]
    [plan] = plan_groups(s, tiny_model)
    n_layer = tiny_model.config.n_layer
    assert sorted(plan.names) == sorted(f"transformer.h.{i}.{m}" for i in range(n_layer) for m in BLOCK)


# ---- one mask update of each algorithm on a small model --------------------------------------------------


def one_step(model: GPT, plugin: MaskedSparsity, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (4, 32), generator=generator)
    model(x, x.roll(-1, dims=1))[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def setup(model: GPT, config: SparsityConfig) -> tuple[MaskedSparsity, torch.optim.Optimizer, dict]:
    """Plug-in and AdamW on `model`; `seen` records each sparse weight's dense gradient and its value right
    before the mask update (hooks registered before the plug-in's, so they see what it sees)."""
    seen: dict[str, dict[str, torch.Tensor]] = {"grad": {}, "weight": {}}
    for name, p in model.named_parameters():
        if p.ndim == 2 and any(name.endswith(b) for b in BLOCK):
            p.register_hook(lambda g, name=name: seen["grad"].__setitem__(name, g.clone()))
    plugin = MaskedSparsity(config, seed=0)
    plugin.apply(model)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    optimizer.register_step_post_hook(
        lambda *_: seen["weight"].update({sp.name: sp.param.detach().clone() for sp in plugin.params})
    )
    plugin.apply_optimizer(optimizer)
    return plugin, optimizer, seen


def test_gmp_prunes_the_smallest_magnitudes_to_the_scheduled_level(tiny_model: GPT) -> None:
    schedule = {"type": "linear", "init": 0.0, "slope": 0.2}
    plugin, optimizer, seen = setup(tiny_model, SparsityConfig(sparsity=schedule, algorithm="gmp", update={"freq": 2}))
    assert all(bool(sp.mask.all()) for sp in plugin.params)  # level 0 at step 0
    for step in (1, 2, 3, 4):
        before = {sp.name: sp.mask.clone() for sp in plugin.params}
        one_step(tiny_model, plugin, optimizer, step)
        for sp in plugin.params:
            if step % 2:
                assert torch.equal(sp.mask, before[sp.name])
                continue
            assert int(sp.mask.sum()) == kept(sp.mask.numel(), float(f32(0.2) * step))
            w = seen["weight"][sp.name].abs()
            assert w[sp.mask].min() >= w[~sp.mask].max()  # the smallest magnitudes went
            assert torch.all(sp.param[~sp.mask] == 0)
            state = optimizer.state[sp.param]
            assert torch.all(state["exp_avg"][~sp.mask] == 0) and torch.all(state["exp_avg_sq"][~sp.mask] == 0)


@pytest.mark.parametrize("algorithm", ["set", "rigl"])
def test_set_and_rigl_drop_the_smallest_and_regrow_as_many(tiny_model: GPT, algorithm: str) -> None:
    config = SparsityConfig(sparsity=0.75, algorithm=algorithm, drop_fraction=0.3, update={"freq": 2})
    plugin, optimizer, seen = setup(tiny_model, config)
    one_step(tiny_model, plugin, optimizer, 1)
    assert not plugin._dense_grads  # kept only for the backward passes of an update step
    before = {sp.name: sp.mask.clone() for sp in plugin.params}
    one_step(tiny_model, plugin, optimizer, 2)
    assert not plugin._dense_grads
    for sp in plugin.params:
        old, new, numel = before[sp.name], sp.mask, sp.mask.numel()
        nnz = int(old.sum())
        dropped, regrown = old & ~new, new & ~old
        survivors = kept(nnz, 0.3)  # drop 30% of the connections, then regrow up to the level
        assert int(new.sum()) == nnz == kept(numel, 0.75)  # sparsity held exactly
        # as many regrown as dropped; fewer than 30% only if a dropped connection was regrown at once
        assert 0 < int(regrown.sum()) == int(dropped.sum()) <= nnz - survivors
        w = seen["weight"][sp.name].abs()
        assert w[dropped].max() <= w[old].topk(survivors).values.min()  # the smallest magnitudes went
        assert torch.all(sp.param[regrown] == 0)  # regrown connections start at zero ...
        state = optimizer.state[sp.param]
        for key in ("exp_avg", "exp_avg_sq"):  # ... with fresh optimizer state
            assert torch.all(state[key][~(old & new)] == 0)
        if algorithm == "rigl":  # regrown where the dense gradient of the step is largest
            g = seen["grad"][sp.name].abs()
            assert g[regrown].min() >= g[~new].max()


def test_set_regrowth_is_random_and_rigl_is_not(tiny_model: GPT, tiny_config) -> None:
    """SET's regrown positions do not follow the gradient; RigL's are its top-k (checked above)."""
    plugin, optimizer, seen = setup(tiny_model, SparsityConfig(sparsity=0.75, algorithm="set", update={"freq": 1}))
    before = {sp.name: sp.mask.clone() for sp in plugin.params}
    one_step(tiny_model, plugin, optimizer, 1)
    sp = plugin.params[0]
    regrown = sp.mask & ~before[sp.name]
    g = seen["grad"][sp.name].abs()[~before[sp.name]]
    rank = g.argsort(descending=True).argsort()  # rank of each pruned position by |grad|
    mean_rank = rank[regrown[~before[sp.name]]].float().mean() / g.numel()
    assert 0.3 < mean_rank < 0.7  # uniform over the pruned positions, unlike RigL's top ranks


def test_dynamic_algorithms_start_dense_when_step_0_is_no_update_step(tiny_model: GPT, tiny_config) -> None:
    schedule = {"type": "linear", "init": 0.5, "slope": 0.01}
    plugin, optimizer, _ = setup(
        tiny_model, SparsityConfig(sparsity=schedule, algorithm="gmp", update={"freq": 3, "start": 3})
    )
    assert all(bool(sp.mask.all()) for sp in plugin.params)  # not at 50%: cstorch trains densely until `start`
    for step in (1, 2, 3):
        one_step(tiny_model, plugin, optimizer, step)
    assert all(int(sp.mask.sum()) == kept(sp.mask.numel(), float(f32(0.5) + 3 * f32(0.01))) for sp in plugin.params)

    # SET and RigL only regrow up to the level, so from dense they shed drop_fraction per update (as cstorch)
    model = GPT(tiny_config)
    plugin, optimizer, _ = setup(model, SparsityConfig(sparsity=0.75, algorithm="set", update={"freq": 3, "start": 3}))
    for step in (1, 2, 3):
        one_step(model, plugin, optimizer, step)
    assert all(int(sp.mask.sum()) == kept(sp.mask.numel(), 0.3) for sp in plugin.params)


def test_non_finite_gradients_skip_the_mask_update(tiny_model: GPT) -> None:
    plugin, optimizer, _ = setup(tiny_model, SparsityConfig(sparsity=[0.75, 0.5], algorithm="rigl", update={"freq": 1}))
    bias = tiny_model.transformer.h[0].mlp.c_fc.bias
    saved = bias.detach().clone()
    masks = [sp.mask.clone() for sp in plugin.params]
    x = torch.randint(0, tiny_model.config.vocab_size, (2, 16))
    tiny_model(x, x)[1].backward()
    bias.grad[0] = float("inf")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert plugin.step == 1
    assert all(torch.equal(sp.mask, m) for sp, m in zip(plugin.params, masks, strict=True))
    assert plugin.groups[0].algorithm.sparsity.state_dict() == {"index": 1}  # the cycle did not advance
    with torch.no_grad():  # undo what the infinite gradient did to the bias, so that training goes on
        bias.copy_(saved)
    del optimizer.state[bias]
    one_step(tiny_model, plugin, optimizer, 2)
    assert all(int(sp.mask.sum()) == kept(sp.mask.numel(), 0.5) for sp in plugin.params)
    assert plugin.groups[0].algorithm.sparsity.state_dict() == {"index": 0}


def test_state_dict_round_trip(tiny_model: GPT, tiny_config) -> None:
    config = SparsityConfig(sparsity=[0.7, 0.75], algorithm="set", drop_fraction=[0.1, 0.2, 0.3], update={"freq": 1})
    plugin, optimizer, _ = setup(tiny_model, config)
    one_step(tiny_model, plugin, optimizer, 1)
    state = plugin.state_dict()
    fresh = MaskedSparsity(config, seed=5)
    fresh.apply(GPT(tiny_config))
    fresh.load_state_dict(state)
    assert fresh.step == 1 and torch.equal(fresh.generator.get_state(), plugin.generator.get_state())
    assert (
        fresh.state_dict()["groups"]
        == state["groups"]
        == [{"algorithm": "set", "sparsity": {"index": 0}, "drop_fraction": {"index": 1}}]
    )
    with pytest.raises(ValueError, match="algorithm 'set', not 'rigl'"):
        other = MaskedSparsity(SparsityConfig(sparsity=0.7, algorithm="rigl"), seed=0)
        other.apply(GPT(tiny_config))
        other.load_state_dict(state)


# ---- N:M, from_weights, groups, ERK, FLOPs ---------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
@pytest.mark.parametrize("init_method", ["random", "topk"])
def test_nm_pattern_holds_in_every_group_of_m(tiny_model: GPT, n: int, m: int, init_method: str) -> None:
    weights = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    plugin, optimizer, _ = setup(tiny_model, SparsityConfig(pattern=NMPattern(n, m), init_method=init_method))
    for step in (1, 2):
        one_step(tiny_model, plugin, optimizer, step)
    for sp in plugin.params:
        rows, cols = sp.mask.shape  # nn.Linear (out, in): runs of m along the input dimension
        runs = sp.mask.reshape(rows, cols // m, m)
        assert torch.all(runs.sum(-1) == n)
        assert torch.all(sp.param[~sp.mask] == 0)
        if init_method == "topk":
            w = weights[sp.name].abs().reshape(rows, cols // m, m)
            smallest_kept = torch.where(runs, w, torch.inf).amin(-1)
            largest_pruned = torch.where(runs, -torch.inf, w).amax(-1)
            assert torch.all(smallest_kept >= largest_pruned)
    assert plugin.stats().global_sparsity == pytest.approx(1 - n / m)


def test_nm_needs_input_dimension_divisible_by_m(tiny_model: GPT) -> None:
    with pytest.raises(ConfigError) as info:
        plan_groups(SparsityConfig(pattern=NMPattern(2, 48)), tiny_model)
    assert info.value.key == "sparsity.pattern" and "m=48" in str(info.value)


@pytest.mark.parametrize("init_method", ["from_weights", "from_zeros"])  # ours and Cerebras' name
def test_from_weights_masks_are_the_loaded_nonzeros(tiny_model: GPT, init_method: str) -> None:
    weight = tiny_model.transformer.h[1].mlp.c_proj.weight
    with torch.no_grad():
        weight[:, ::3] = 0
    plugin = MaskedSparsity(SparsityConfig(sparsity=0.5, init_method=init_method), seed=0)
    plugin.apply(tiny_model)
    assert torch.equal(tiny_model.transformer.h[1].mlp.c_proj.weight_mask, weight != 0)
    assert bool(tiny_model.transformer.h[0].mlp.c_fc.weight_mask.all())


def test_checkerboard_is_cstorchs_pattern() -> None:
    rows, cols, density = 8, 16, 0.25
    # cstorch.sparse.init.checkerboard, as written there: one spread row, rolled by one period per row
    steps = torch.floor(torch.arange(cols + math.ceil(cols / density + 1e-5)) * density + 1e-5)
    row = steps[1:] != steps[:-1]
    offset = -math.floor(1 / density - 1e-5)
    expected = torch.stack([torch.roll(row, r * offset) for r in range(rows)])[..., :cols]
    mask = checkerboard_mask(torch.Size([rows, cols]), 0.75)
    assert torch.equal(mask, expected)
    assert torch.all(mask.sum(1) == 4) and torch.all(mask.sum(0) == 2)


def test_groups_first_matching_filter_wins(tiny_model: GPT) -> None:
    config = SparsityConfig(
        groups=[
            SparsityGroupConfig(param_filter="*attn.*.weight", sparsity=0.5),
            SparsityGroupConfig(sparsity=0.75, algorithm="rigl"),  # default filter: what is left, the MLP
        ]
    )
    config.validate()
    plugin, optimizer, _ = setup(tiny_model, config)
    for step in (1, 2):
        one_step(tiny_model, plugin, optimizer, step)
    for sp in plugin.params:
        level = 0.5 if ".attn." in sp.name else 0.75
        assert int(sp.mask.sum()) == kept(sp.mask.numel(), level), sp.name
    assert [len(g.params) for g in plugin.groups] == [4, 4]
    assert config.summary()["groups"][1] == {
        "algorithm": "rigl",
        "target_sparsity": 0.75,
        "pattern": "unstructured",
        "param_filter": None,
    }


def test_erk_follows_the_formula_and_keeps_the_group_level(tiny_model: GPT) -> None:
    shapes = [(192, 64), (64, 64), (256, 64), (64, 256), (8, 4)]
    levels = distribute(0.9, shapes, "erk")
    numels = [a * b for a, b in shapes]
    densities = [1 - s for s in levels]
    assert densities[-1] == 1.0  # (8 + 4) / 32 is too large a share: dense
    scale = densities[0] / ((192 + 64) / (192 * 64))
    for (a, b), d in zip(shapes[:-1], densities[:-1], strict=True):
        assert d == pytest.approx(scale * (a + b) / (a * b))
    assert sum(s * n for s, n in zip(levels, numels, strict=True)) / sum(numels) == pytest.approx(0.9)

    plugin = MaskedSparsity(SparsityConfig(sparsity=0.75, distribution="erk"), seed=0)
    plugin.apply(tiny_model)
    per_param = plugin.stats().per_param
    # (in + out) / (in * out): attention's square output projection is denser than the MLP's 4x wide matrices
    assert per_param["transformer.h.0.attn.c_proj.weight"] < 0.75 < per_param["transformer.h.0.mlp.c_fc.weight"]
    assert plugin.stats().global_sparsity == pytest.approx(0.75, abs=2e-4)  # one truncated entry per tensor


def test_flops_charge_each_group_along_its_own_schedule(tiny_model: GPT, tiny_config) -> None:
    groups = SparsityConfig(
        groups=[
            SparsityGroupConfig(param_filter="*attn.*.weight", pattern=NMPattern(2, 4)),
            SparsityGroupConfig(
                sparsity={"type": "cosine", "init": 0.0, "minimum": 0.75, "half_period": 300},
                algorithm="gmp",
                update={"freq": 10, "stop": 301},
            ),
        ]
    )
    target, run = flop_report(tiny_config, 64, groups), flop_report(tiny_config, 64, groups, steps=400)
    for report in (target, run):
        terms = {t.name: t for t in report.terms}
        assert (
            terms["attention qkv"].sparse
            == terms["attention qkv"].final
            == pytest.approx(0.5 * terms["attention qkv"].dense)
        )
        assert terms["mlp in"].final == pytest.approx(0.25 * terms["mlp in"].dense)
    assert not target.varies and {t.name: t for t in target.terms}["mlp in"].sparse == pytest.approx(
        0.25 * terms["mlp in"].dense
    )
    assert terms["mlp in"].sparse == pytest.approx((1 - GMP_75_AVERAGE) * terms["mlp in"].dense, rel=1e-6)
    assert run.varies and run.average_sparsity < 0.5 < run.final_sparsity < 0.75


def recorded_run(model: GPT, config: SparsityConfig, steps: int) -> tuple[MaskedSparsity, list[dict[str, float]], int]:
    """Train `steps` steps; the fraction each mask prunes during every step, and how many steps kept dense grads."""
    plugin, optimizer, _ = setup(model, config)
    held, captured = [], 0
    for step in range(1, steps + 1):
        held.append({sp.name: 1 - sp.mask.float().mean().item() for sp in plugin.params})
        captured += plugin._capture
        one_step(model, plugin, optimizer, step)
    return plugin, held, captured


@pytest.mark.parametrize(
    "config",
    [
        # dense until the first update at step 3, then a linear schedule every 3 steps
        SparsityConfig(
            sparsity={"type": "linear", "init": 0.2, "slope": 0.05}, algorithm="gmp", update={"freq": 3, "start": 3}
        ),
        SparsityConfig(sparsity=[0.5, 0.7, 0.6], algorithm="set", update={"freq": 2}),  # cycled, one per update
        SparsityConfig(sparsity=0.75, algorithm="rigl", update={"freq": 4, "start": 2}, distribution="erk"),
    ],
    ids=["gmp-dense-start", "set-cycling", "rigl-erk"],
)
def test_run_levels_are_the_levels_a_run_holds(tiny_model: GPT, config: SparsityConfig) -> None:
    """`run_levels` (what FLOPs integrate) against the masks of a real run of 10 steps, step by step."""
    steps = 10
    plugin, held, captured = recorded_run(tiny_model, config, steps)
    levels = run_levels(config, tiny_model, steps)
    for sp in plugin.params:
        tolerance = 4 / sp.mask.numel()  # masks hold whole entries: one truncated entry per draw, <= 4 draws here
        assert levels.average[sp.name] == pytest.approx(sum(h[sp.name] for h in held) / steps, abs=tolerance)
        assert levels.final[sp.name] == pytest.approx(1 - sp.mask.float().mean().item(), abs=tolerance)
        if config.algorithm == "rigl":  # dense gradients on the steps before the updates at 2, 6 and 10
            assert captured == 3
            filled = sum(held[k][sp.name] for k in (1, 5, 9)) / steps  # at the masks those steps ran with
            assert levels.dense_grad[sp.name] == pytest.approx(filled, abs=tolerance)
    assert config.algorithm == "rigl" or not levels.dense_grad


# ---- an independent reference: plain torch, the cstorch rules, no library code ---------------------------

STEPS, FREQ, SEED = 12, 3, 7


def reference_run(algorithm: str, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """Masked training with GMP / SET / RigL written from the algorithms' definitions; returns masks per step."""
    generator = torch.Generator().manual_seed(SEED)
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2}

    def top(score: torch.Tensor, k: int) -> torch.Tensor:
        keep = torch.zeros(score.numel(), dtype=torch.bool)
        keep[torch.argsort(score.flatten(), descending=True, stable=True)[:k]] = True
        return keep.view_as(score)

    def level(step: int) -> float:
        if algorithm == "gmp":  # linear from 0, slope 0.05
            return float(f32(0.0) + torch.tensor(step) * f32(0.05))
        return 0.75

    def drop_fraction(step: int) -> float:  # cosine from 0.3 down to 0 at step 12
        return float(f32(0.15) * torch.cos(torch.tensor(step) * f32(math.pi / 12)) + f32(0.15))

    masks = {n: top(torch.rand(p.shape, generator=generator), kept(p.numel(), level(0))) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = []
    for step in range(1, STEPS + 1):
        for x, y in batches[2 * (step - 1) : 2 * step]:  # two micro-batches per step
            (nn.functional.mse_loss(model(x), y) / 2).backward()
        dense = {n: p.grad.clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.grad.mul_(masks[n])
                if "momentum_buffer" in optimizer.state[p]:
                    optimizer.state[p]["momentum_buffer"].mul_(masks[n])
        optimizer.step()
        with torch.no_grad():
            for n, p in params.items():
                p.mul_(masks[n])
            if step % FREQ == 0:
                for n, p in params.items():
                    old = masks[n]
                    if algorithm == "gmp":
                        new = top(p.abs(), kept(p.numel(), level(step)))
                    else:
                        survivors = kept(int(old.sum()), drop_fraction(step))
                        new = top(torch.where(old, p.abs(), -torch.inf), survivors)
                        score = torch.rand(p.shape, generator=generator) if algorithm == "set" else dense[n].abs()
                        grow = kept(p.numel(), level(step)) - survivors
                        new = new | top(torch.where(new, -torch.inf, score), grow)
                    unchanged = old & new
                    p.mul_(unchanged)
                    optimizer.state[p]["momentum_buffer"].mul_(unchanged)
                    masks[n] = new
        optimizer.zero_grad(set_to_none=True)
        history.append({n: m.clone() for n, m in masks.items()})
    return history


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    # tanh, not ReLU: no weight has an exactly zero gradient, so magnitudes never tie at 0
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))


@pytest.mark.parametrize("algorithm", ["gmp", "set", "rigl"])
def test_matches_an_independent_reference(algorithm: str) -> None:
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 16, generator=generator), torch.randn(8, 8, generator=generator)) for _ in range(2 * STEPS)
    ]
    reference = toy_model()
    expected = reference_run(algorithm, reference, batches)

    config = SparsityConfig(
        sparsity={"type": "linear", "init": 0.0, "slope": 0.05} if algorithm == "gmp" else 0.75,
        algorithm=algorithm,
        update={"freq": FREQ},
        drop_fraction=None if algorithm == "gmp" else {"type": "cosine", "init": 0.3, "half_period": 12},
    )
    config.validate()
    model = toy_model()
    plugin = MaskedSparsity(config, seed=SEED)
    plugin.apply(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plugin.apply_optimizer(optimizer)
    for step in range(1, STEPS + 1):
        for x, y in batches[2 * (step - 1) : 2 * step]:
            (nn.functional.mse_loss(model(x), y) / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for sp in plugin.params:
            assert torch.equal(sp.mask, expected[step - 1][sp.name]), (step, sp.name)
    assert any(not torch.equal(expected[0][n], expected[-1][n]) for n in expected[0])  # masks did move
    ours = model.state_dict()
    for name, theirs in reference.state_dict().items():
        assert torch.equal(ours[name], theirs), name
    zeros = sum(int((p == 0).sum()) for n, p in reference.named_parameters() if p.ndim == 2)
    numel = sum(p.numel() for n, p in reference.named_parameters() if p.ndim == 2)
    assert plugin.stats().global_sparsity == zeros / numel

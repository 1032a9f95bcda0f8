"""Masked-dense sparsity invariants (Cerebras semantics) and parameter selection."""

from __future__ import annotations

import pytest
import torch

from modelzoo.config.train import OptimConfig
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.optim import build_optimizer
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.names import cerebras_names, select_parameters
from modelzoo.sparsity.plugin import MaskedSparsity, masked, prune_

BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The `param_filter` of Cerebras' GPT-3 sparsity recipes, copied unchanged.
CEREBRAS_FILTER = ["*proj_[qkv]_dense_layer.weight", "*proj_output_dense_layer.weight", "*linear_layer.weight"]


def expected_matrices(model: GPT) -> list[str]:
    return [f"transformer.h.{i}.{m}" for i in range(model.config.n_layer) for m in BLOCK_MATRICES]


def test_default_filter_is_cerebras_default(tiny_model: GPT) -> None:
    assert sorted(select_parameters(tiny_model, None)) == sorted(expected_matrices(tiny_model))


def test_cerebras_filters_select_our_weights(tiny_model: GPT) -> None:
    assert sorted(select_parameters(tiny_model, CEREBRAS_FILTER)) == sorted(expected_matrices(tiny_model))
    assert select_parameters(tiny_model, ["*ffn.ffn.0.linear_layer.weight"]) == [
        f"transformer.h.{i}.mlp.c_fc.weight" for i in range(tiny_model.config.n_layer)
    ]
    assert select_parameters(tiny_model, ["*mlp.c_fc.weight"]) == select_parameters(
        tiny_model, ["*ffn.ffn.0.linear_layer.weight"]
    )
    assert cerebras_names("transformer.h.3.attn.c_attn.bias") == tuple(
        f"transformer_decoder.layers.3.self_attn.proj_{x}_dense_layer.bias" for x in "qkv"
    )


@pytest.mark.parametrize("level", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("init_method", ["random", "topk"])
def test_exact_sparsity_per_tensor_and_persistent_masks(tiny_model: GPT, level: float, init_method: str) -> None:
    plugin = MaskedSparsity(SparsityConfig(sparsity=level, init_method=init_method), seed=0)
    plugin.apply(tiny_model)
    state = tiny_model.state_dict()
    for sp in plugin.params:
        mask = state[sp.name + "_mask"]
        assert mask.dtype == torch.bool
        # cstorch's count: keep int(float32(1 - level) * numel) entries (make_mask_topk_sparsity)
        assert int(mask.sum()) == int((1 - torch.tensor(level)) * mask.numel())
        assert torch.all(sp.param[~mask] == 0)
    stats = plugin.stats()
    assert set(stats.per_param) == set(expected_matrices(tiny_model))
    assert all(v == pytest.approx(level, abs=1 / 1000) for v in stats.per_param.values())


def test_topk_keeps_largest_magnitudes(tiny_model: GPT) -> None:
    weight = tiny_model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    plugin = MaskedSparsity(SparsityConfig(sparsity=0.75, init_method="topk"), seed=0)
    plugin.apply(tiny_model)
    mask = tiny_model.transformer.h[0].mlp.c_fc.weight_mask
    assert weight.abs()[mask].min() >= weight.abs()[~mask].max()


def test_random_masks_are_deterministic_in_seed(tiny_config) -> None:
    def masks(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = GPT(tiny_config)
        plugin = MaskedSparsity(SparsityConfig(sparsity=0.75), seed=seed)
        plugin.apply(model)
        return [sp.mask.clone() for sp in plugin.params]

    assert all(torch.equal(a, b) for a, b in zip(masks(1), masks(1), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(masks(1), masks(2), strict=True))


def test_training_keeps_pruned_weights_grads_and_adam_state_at_zero(tiny_model: GPT) -> None:
    plugin = MaskedSparsity(SparsityConfig(sparsity=0.75), seed=0)
    plugin.apply(tiny_model)
    optimizer = build_optimizer(tiny_model, OptimConfig(lr=1e-2))
    plugin.apply_optimizer(optimizer)
    masks_before = {sp.name: sp.mask.clone() for sp in plugin.params}
    values_before = {sp.name: sp.param.detach().clone() for sp in plugin.params}
    torch.manual_seed(1)
    for _ in range(25):
        x = torch.randint(0, tiny_model.config.vocab_size, (4, 32))
        _, loss = tiny_model(x, x.roll(-1, dims=1))
        loss.backward()
        for sp in plugin.params:  # pruned gradients are zero before clipping and the step
            assert torch.all(sp.param.grad[~sp.mask] == 0)
            assert sp.param.grad[sp.mask].abs().sum() > 0
        torch.nn.utils.clip_grad_norm_(tiny_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    for sp in plugin.params:
        assert torch.equal(sp.mask, masks_before[sp.name])  # static: masks never move
        assert torch.all(sp.param[~sp.mask] == 0)
        assert not torch.equal(sp.param[sp.mask], values_before[sp.name][sp.mask])  # kept weights train
        state = optimizer.state[sp.param]
        assert torch.all(state["exp_avg"][~sp.mask] == 0)
        assert torch.all(state["exp_avg_sq"][~sp.mask] == 0)
    assert plugin.stats().global_sparsity == pytest.approx(0.75, abs=1e-3)


def test_masks_follow_the_model_to_another_device_or_dtype(tiny_model: GPT) -> None:
    """Hooks look the mask up on the module, so `model.to(...)` replacing buffers keeps them in force."""
    plugin = MaskedSparsity(SparsityConfig(sparsity=0.5), seed=0)
    plugin.apply(tiny_model)
    tiny_model.to(torch.float64)
    x = torch.randint(0, tiny_model.config.vocab_size, (2, 8))
    tiny_model(x, x)[1].backward()
    sp = plugin.params[0]
    assert torch.all(sp.param.grad[~sp.mask] == 0)


def test_new_masks_loaded_in_place_take_effect(tiny_model: GPT) -> None:
    """Hooks read the mask buffer at every use, so a mask refilled by `load_state_dict` (resume) is in force."""
    plugin = MaskedSparsity(SparsityConfig(sparsity=0.5), seed=0)
    plugin.apply(tiny_model)
    x = torch.randint(0, tiny_model.config.vocab_size, (2, 8))
    tiny_model(x, x)[1].backward()
    state = tiny_model.state_dict()
    new_masks = {sp.name + "_mask": ~state[sp.name + "_mask"] for sp in plugin.params}
    tiny_model.load_state_dict({**state, **new_masks})
    tiny_model.zero_grad()
    tiny_model(x, x)[1].backward()
    for sp in plugin.params:
        assert torch.equal(sp.mask, new_masks[sp.name + "_mask"])
        assert torch.all(sp.param.grad[~sp.mask] == 0)


def test_initial_masks_leave_the_plugin_as_it_was_and_apply_runs_once(tiny_model: GPT) -> None:
    plugin = MaskedSparsity(SparsityConfig(sparsity=0.75), seed=3)
    generator_state = plugin.generator.get_state()
    first, second = plugin.initial_masks(tiny_model), plugin.initial_masks(tiny_model)
    assert plugin.groups == [] and plugin.params == [] and torch.equal(plugin.generator.get_state(), generator_state)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    plugin.apply(tiny_model)
    assert all(torch.equal(sp.mask, first[sp.name]) for sp in plugin.params)  # the masks `apply` attaches
    with pytest.raises(RuntimeError, match="already called"):
        plugin.apply(tiny_model)
    weight = plugin.params[0].param
    assert len(weight._backward_hooks or {}) == 1  # one gradient hook per sparse weight


# ---- non-finite gradients (cstorch selects with torch.where(mask, grad, 0); inf * 0 would be NaN) ---------

NON_FINITE = (float("inf"), float("-inf"), float("nan"))
ALGORITHM_CONFIGS = {
    "static": SparsityConfig(sparsity=0.75),
    "gmp": SparsityConfig(sparsity={"type": "linear", "init": 0.5, "slope": 0.05}, algorithm="gmp", update={"freq": 1}),
    "set": SparsityConfig(sparsity=0.75, algorithm="set", update={"freq": 1}),
    "rigl": SparsityConfig(sparsity=0.75, algorithm="rigl", update={"freq": 1}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masking_is_torch_where_bit_for_bit(dtype: torch.dtype) -> None:
    """`masked` / `prune_` give exactly `torch.where(mask, x, 0)` (cstorch's select), inf, NaN and -0.0 included."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=generator).to(dtype)
    mask = torch.rand(8, 16, generator=generator) < 0.5
    x.view(-1)[:6] = torch.tensor([float("inf"), float("nan"), -0.0, float("-inf"), float("nan"), -0.0], dtype=dtype)
    mask.view(-1)[:6] = torch.tensor([False, False, False, True, True, True])  # pruned, then kept
    expected = torch.where(mask, x, 0)
    pruned = x.clone()
    prune_(pruned, mask)
    for result in (masked(x, mask), pruned):
        assert result.dtype == dtype and torch.equal(result.view(torch.int8), expected.view(torch.int8))


def poison_gradients(model: GPT, kept: bool) -> None:
    """Put inf, -inf and NaN into every sparse weight's gradient at three pruned positions (and, with `kept`,
    also at three kept ones), before the plug-in masks it: hooks registered before `apply` run before its own."""
    for name in expected_matrices(model):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)

        def hook(grad: torch.Tensor, module=module, leaf=leaf) -> torch.Tensor:
            mask = getattr(module, leaf + "_mask")
            grad = grad.clone()
            for positions in ((~mask).nonzero(), mask.nonzero()) if kept else ((~mask).nonzero(),):
                for position, value in zip(positions[:3], NON_FINITE, strict=True):
                    grad[tuple(position)] = value
            return grad

        model.get_parameter(name).register_hook(hook)


def train_steps(config: GPTConfig, sparsity: SparsityConfig, steps: int, poison: bool | None) -> tuple:
    """`steps` clipped AdamW steps as the trainer takes them; `poison`: None (clean), False (non-finite values at
    pruned positions) or True (at pruned and kept ones). Returns the plug-in, optimizer and masks before each step."""
    torch.manual_seed(0)
    model = GPT(config)
    if poison is not None:
        poison_gradients(model, kept=poison)
    plugin = MaskedSparsity(sparsity, seed=0)
    plugin.apply(model)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    plugin.apply_optimizer(optimizer)
    generator, masks = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        masks.append([sp.mask.clone() for sp in plugin.params])
        x = torch.randint(0, config.vocab_size, (4, 32), generator=generator)
        model(x, x.roll(-1, dims=1))[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return plugin, optimizer, masks


@pytest.mark.parametrize("algorithm", ["static", "gmp", "set"])
def test_non_finite_gradients_at_pruned_positions_change_nothing(tiny_config: GPTConfig, algorithm: str) -> None:
    """inf / NaN where a mask prunes is selected away before clipping: three steps (with mask updates) equal a
    clean run bit for bit, weights, masks and AdamW state (multiplying by the mask would make them NaN)."""
    clean, clean_optimizer, _ = train_steps(tiny_config, ALGORITHM_CONFIGS[algorithm], 3, poison=None)
    poisoned, poisoned_optimizer, _ = train_steps(tiny_config, ALGORITHM_CONFIGS[algorithm], 3, poison=False)
    for a, b in zip(clean.params, poisoned.params, strict=True):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.param, b.param), a.name
        assert torch.all(b.param[~b.mask] == 0)
        for key, value in clean_optimizer.state[a.param].items():
            assert torch.equal(value, poisoned_optimizer.state[b.param][key]), (a.name, key)


def test_rigl_skips_updates_on_a_non_finite_dense_gradient_but_trains(tiny_config: GPTConfig) -> None:
    """RigL regrows from the unmasked gradient, which holds the inf / NaN: its updates are skipped (masks as
    drawn), while the masked gradient is finite, so the weights train and the pruned ones stay exactly 0."""
    plugin, _, masks = train_steps(tiny_config, ALGORITHM_CONFIGS["rigl"], 3, poison=False)
    for i, sp in enumerate(plugin.params):
        assert torch.equal(sp.mask, masks[0][i]), sp.name
        assert torch.isfinite(sp.param).all() and torch.all(sp.param[~sp.mask] == 0), sp.name


@pytest.mark.parametrize("algorithm", list(ALGORITHM_CONFIGS))
def test_non_finite_gradients_at_kept_positions_keep_masks_and_exact_zeros(
    tiny_config: GPTConfig, algorithm: str
) -> None:
    """inf / NaN at kept positions too: clipping spreads NaN over every gradient and the kept weights diverge,
    but each step's mask update is skipped (masks unchanged) and every pruned weight stays exactly 0."""
    plugin, _, masks = train_steps(tiny_config, ALGORITHM_CONFIGS[algorithm], 2, poison=True)
    for i, sp in enumerate(plugin.params):
        assert torch.equal(sp.mask, masks[0][i]) and torch.equal(sp.mask, masks[1][i]), sp.name
        assert torch.equal(sp.param[~sp.mask], torch.zeros(int((~sp.mask).sum()))), sp.name
        assert not torch.isfinite(sp.param[sp.mask]).all()  # the poison did reach the kept weights
    assert plugin.step == 2

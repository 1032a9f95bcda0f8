"""Masked-dense sparsity invariants (Cerebras semantics) and parameter selection."""

from __future__ import annotations

import pytest
import torch

from modelzoo.models.gpt import GPT
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.names import cerebras_names, select_parameters
from modelzoo.sparsity.plugin import MaskedSparsity
from modelzoo.train.config import OptimConfig
from modelzoo.train.optim import build_optimizer

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
    """The cached float multiplier follows a mask refilled by `load_state_dict` (e.g. on resume)."""
    plugin = MaskedSparsity(SparsityConfig(sparsity=0.5), seed=0)
    plugin.apply(tiny_model)
    x = torch.randint(0, tiny_model.config.vocab_size, (2, 8))
    tiny_model(x, x)[1].backward()  # builds the multiplier cache for the old masks
    state = tiny_model.state_dict()
    new_masks = {sp.name + "_mask": ~state[sp.name + "_mask"] for sp in plugin.params}
    tiny_model.load_state_dict({**state, **new_masks})
    tiny_model.zero_grad()
    tiny_model(x, x)[1].backward()
    for sp in plugin.params:
        assert torch.equal(sp.mask, new_masks[sp.name + "_mask"])
        assert torch.all(sp.param.grad[~sp.mask] == 0)

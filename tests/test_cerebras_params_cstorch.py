"""Against the real `cerebras.pytorch`: written params sparsify exactly our planned tensors; cstorch.save files import.

Runs only where `cerebras.pytorch` imports (the Cerebras venv, `scripts/make_cerebras_venv.sh`); skipped elsewhere,
failed instead under MODELZOO_REQUIRE_CEREBRAS=1 (the `cstorch` fixture in conftest.py).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from modelzoo.backends.cerebras.checkpoint import (
    from_cerebras_state_dict,
    load_cerebras_state_dict,
    to_cerebras_state_dict,
)
from modelzoo.backends.cerebras.params import CerebrasRecipe, read_params, to_params
from modelzoo.models.gpt import GPTConfig
from modelzoo.models.registry import ModelConfig, build_model
from modelzoo.sparsity.config import SparsityConfig, SparsityGroupConfig
from modelzoo.sparsity.names import cerebras_names
from modelzoo.sparsity.plan import plan_groups
from modelzoo.sparsity.plugin import MaskedSparsity

pytestmark = pytest.mark.cerebras

DATA = Path(__file__).parent / "data" / "cerebras_modelzoo"
SMALL = GPTConfig(name="small", n_layer=2, n_embd=64, n_head=2, n_inner=128, n_positions=32, vocab_size=100)
LLAMA = "llama_tiny_gqa_llama3_static50.yaml"
# Our Llama fixture's model (GQA, Llama-3 scaling, untied head) at 2 layers and 100 tokens.
SMALL_LLAMA = replace(read_params(DATA / LLAMA).model, name="small", n_layer=2, vocab_size=100)


@pytest.fixture(scope="module")
def backend(cstorch):
    """The process's one cstorch backend (a CPU one unless another test made one first)."""
    return cstorch.current_backend(raise_exception=False, raise_warning=False) or cstorch.backend(
        "CPU", artifact_dir=tempfile.mkdtemp()
    )


def cerebras_named_module(config: ModelConfig) -> nn.Module:
    """A module tree with the parameter names and shapes of the Cerebras Model Zoo GPT or Llama of `config`."""
    root = nn.Module()
    state = to_cerebras_state_dict(build_model(config).state_dict(), config)
    for name, value in state.items():
        if name == "lm_head.weight" and value is state["embedding_layer.word_embeddings.weight"]:  # tied
            continue
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(torch.zeros_like(value)))
    return root


def sparsified_by_cstorch(cstorch: ModuleType, spec: object, config: ModelConfig) -> list[str]:
    module = cerebras_named_module(config)
    cstorch.sparse.configure(spec).apply(module)
    return sorted(n.removesuffix("_mask") for n, _ in module.named_buffers() if n.endswith("_mask"))


def planned_in_cerebras_names(sparsity: SparsityConfig, config: ModelConfig) -> list[str]:
    with torch.device("meta"):
        plans = plan_groups(sparsity, build_model(config))
    return sorted(s for plan in plans for name in plan.names for s in cerebras_names(name))


@pytest.mark.parametrize("name", [*sorted(p.name for p in DATA.glob("gpt3_125m_*.yaml")), LLAMA])
def test_real_recipes_written_back_select_the_same_tensors_in_cstorch(cstorch, backend, name: str) -> None:
    sparsity = read_params(DATA / name).sparsity
    model = SMALL_LLAMA if name == LLAMA else SMALL
    spec = to_params(CerebrasRecipe(model=model, sparsity=sparsity))["sparsity"]
    assert sparsified_by_cstorch(cstorch, spec, model) == planned_in_cerebras_names(sparsity, model)


def test_our_llama_name_globs_written_back_select_the_same_tensors_in_cstorch(cstorch, backend) -> None:
    sparsity = SparsityConfig(
        groups=[
            SparsityGroupConfig(sparsity=0.5, param_filter=["model.layers.1.self_attn.[qk]_proj.weight", "lm_head.*"]),
            SparsityGroupConfig(sparsity=0.9, param_filter=["*mlp.*_proj.weight"]),
        ]
    )
    spec = to_params(CerebrasRecipe(model=SMALL_LLAMA, sparsity=sparsity))["sparsity"]
    selected = sparsified_by_cstorch(cstorch, spec, SMALL_LLAMA)
    assert "lm_head.weight" in selected and len(selected) == 2 + 1 + 2 * 3  # q, k of layer 1; head; 3 MLP x 2
    assert selected == planned_in_cerebras_names(sparsity, SMALL_LLAMA)


def test_our_name_globs_and_groups_written_back_select_the_same_tensors_in_cstorch(cstorch, backend) -> None:
    sparsity = SparsityConfig(
        groups=[
            SparsityGroupConfig(sparsity=0.5, param_filter=["transformer.h.1.attn.c_attn.weight"]),
            SparsityGroupConfig(sparsity=0.9, param_filter=["*mlp.c_fc.weight"]),
        ]
    )
    spec = to_params(CerebrasRecipe(model=SMALL, sparsity=sparsity))["sparsity"]
    assert sparsified_by_cstorch(cstorch, spec, SMALL) == planned_in_cerebras_names(sparsity, SMALL)


@pytest.mark.parametrize("config", [SMALL, SMALL_LLAMA], ids=["gpt", "llama"])
def test_a_cstorch_save_checkpoint_imports_with_its_masks(cstorch, backend, tmp_path: Path, config) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    MaskedSparsity(SparsityConfig(sparsity=0.75), seed=1).apply(model)
    theirs = to_cerebras_state_dict(model.state_dict(), config)
    cstorch.save({"model": theirs, "global_step": 3}, str(tmp_path / "c.mdl"))
    state, masks = from_cerebras_state_dict(load_cerebras_state_dict(tmp_path / "c.mdl"), config)
    ours = model.state_dict()
    assert sorted(f"{n}_mask" for n in masks) == sorted(k for k in ours if k.endswith("_mask"))
    assert all(torch.equal(masks[n], ours[f"{n}_mask"]) for n in masks)
    assert all(torch.equal(state[k], ours[k]) for k in state)

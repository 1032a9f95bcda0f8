"""The Llama family: logits parity with `transformers.LlamaForCausalLM` both ways, the sparse export, KV-cache
decoding, the named sizes' parameter counts and FLOPs, and a sparse pre-training run that exports and resumes.

Parity measured here (fp32, CPU, transformers 5.x): our logits equal HF's exactly (max abs difference 0.0) on the
configs below; the tolerance 1e-5 leaves room for other kernels' summation orders, not for a wrong RoPE convention
(Llama-3 scaling skipped moves these logits by 1.8e-3, 180 times the tolerance).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from modelzoo import checkpoint as ckpt
from modelzoo.config import load_config, to_object
from modelzoo.errors import ConfigError
from modelzoo.export.hf import SPARSITY_FILE, export_hf, from_hf_config, load_hf, to_hf_config, to_hf_state_dict
from modelzoo.flops import flop_report
from modelzoo.generate import generate
from modelzoo.memory import memory_plan
from modelzoo.models.llama import Llama, LlamaConfig, RopeScaling
from modelzoo.report import parameter_counts
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.sparsity.plugin import MaskedSparsity
from modelzoo.tasks.pretrain import Pretraining
from tests.conftest import killed_at_step, make_config, train_losses
from tests.test_export import make_tokenizer

TOLERANCE = 1e-5  # fp32; measured 0.0 (module docstring)
# GQA (2 query heads per key/value head) and Llama-3 scaling whose original context (16) is short enough that the
# scaling moves low, medium and high frequencies of a 16-dim head.
SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
SMALL = LlamaConfig(
    name="t", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_inner=160, n_positions=64, vocab_size=100,
    rope_theta=500000.0, rope_scaling=SCALING,
)  # fmt: skip


def make_model(config: LlamaConfig = SMALL, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(config).eval()
    with torch.no_grad():  # RMSNorm weights away from 1, so a norm applied to the wrong tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_equal_transformers_in_both_directions(tied: bool) -> None:
    config = replace(SMALL, tie_word_embeddings=tied)
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    ours = make_model(config)
    hf = LlamaForCausalLM(to_hf_config(config)).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=not tied)
    rope = getattr(hf.config, "rope_parameters", None) or hf.config.rope_scaling  # transformers 5.x, 4.x
    assert rope["rope_type"] == "llama3" and hf.config.num_key_value_heads == 2
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max() <= TOLERANCE

    torch.manual_seed(2)  # HF -> ours: a model initialised by transformers
    hf = LlamaForCausalLM(to_hf_config(config)).eval()
    back_config = from_hf_config(hf.config, name="t")
    assert back_config == config
    back = Llama(back_config).eval()
    back.load_state_dict(
        {k: v for k, v in hf.state_dict().items()} | ({"lm_head.weight": hf.lm_head.weight} if tied else {})
    )
    with torch.no_grad():
        assert (back(ids)[0] - hf(ids).logits).abs().max() <= TOLERANCE


def test_rope_convention_and_scaling_matter() -> None:
    """The parity test can catch a wrong rotary convention: without the Llama-3 scaling the logits move."""
    ids = torch.randint(0, SMALL.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    scaled, plain = make_model(SMALL), make_model(replace(SMALL, rope_scaling=None))
    with torch.no_grad():
        assert (scaled(ids)[0] - plain(ids)[0]).abs().max() > 100 * TOLERANCE  # measured 1.8e-3


def test_sparse_export_loads_with_transformers_alone(tmp_path: Path) -> None:
    model = make_model()
    sparsifier = MaskedSparsity(SparsityConfig(sparsity=0.5), seed=0)
    sparsifier.apply(model)
    masks = {k.removesuffix(MASK_SUFFIX): v for k, v in model.state_dict().items() if k.endswith(MASK_SUFFIX)}
    assert sorted({k.split(".")[-2] for k in masks}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    directory = export_hf(model, tmp_path / "hf", tokenizer=make_tokenizer(), sparsity_info={"algorithm": "static"})
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert isinstance(hf, LlamaForCausalLM)
    ids = torch.randint(0, SMALL.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max() <= TOLERANCE
    hf_state = hf.state_dict()
    for name, mask in masks.items():
        assert torch.all(hf_state[name][~mask] == 0), name
    report = json.loads((directory / SPARSITY_FILE).read_text())
    assert set(report["per_tensor"]) == set(masks) and report["global_sparsity"] >= 0.5
    saved = json.loads((directory / "config.json").read_text())
    assert saved["num_key_value_heads"] == 2 and saved["tie_word_embeddings"] is False
    # Both transformers 4.x's keys and (when written by 5.x) its `rope_parameters`: either version loads the export.
    assert saved["rope_scaling"]["rope_type"] == "llama3" and saved["rope_theta"] == 500000.0
    if "rope_parameters" in saved:
        assert saved["rope_parameters"]["rope_type"] == "llama3" and saved["rope_parameters"]["rope_theta"] == 500000.0
    assert load_hf(directory).config == replace(SMALL, name="hf")


def test_unsupported_hf_llama_options_are_refused() -> None:
    hf_config = to_hf_config(SMALL)
    hf_config.mlp_bias = True
    with pytest.raises(ConfigError, match="mlp_bias"):
        from_hf_config(hf_config)


def test_kv_cache_decoding_equals_full_recompute() -> None:
    model = make_model()
    ids = torch.randint(0, SMALL.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(2, 40)
    assert cache.k.shape == (2, 2, 2, 40, 16)  # (L, B, n_kv_head, max_len, head_dim): the cache holds K/V heads only
    with torch.no_grad():
        steps = [model(ids[:, :25], cache=cache)[0], *(model(ids[:, t : t + 1], cache=cache)[0] for t in range(25, 40))]
        assert (torch.cat(steps, dim=1) - model(ids)[0]).abs().max() <= TOLERANCE
    prompt = ids[0, :5].tolist()
    assert generate(model, prompt, 20, use_cache=True).tokens == generate(model, prompt, 20, use_cache=False).tokens


# HF's own counts of the models each size mirrors (`LlamaForCausalLM(config).num_parameters()`).
SIZES = {"llama3_1b": 1_235_814_400, "llama2_7b": 6_738_415_616, "llama3_8b": 8_030_261_248}


@pytest.mark.parametrize("size", ["llama_tiny", *SIZES])
def test_named_sizes_match_hf_parameter_counts_and_flops(size: str) -> None:
    config = to_object(load_config([f"model={size}"])).model
    with torch.device("meta"):
        hf = LlamaForCausalLM(to_hf_config(config))
    total = parameter_counts(config)["total"]
    assert total == hf.num_parameters() == SIZES.get(size, total)
    report = {t.name: t.dense for t in flop_report(config, 2048).terms}
    h, kv, f, L = config.n_embd, config.n_kv_head * config.head_dim, config.n_inner, config.n_layer
    assert report["attention qkv"] == 2 * L * (h * h + 2 * h * kv)  # GQA: K and V are n_kv_head / n_head of Q
    assert report["mlp in"] == 2 * L * 2 * h * f and report["mlp out"] == 2 * L * f * h  # SwiGLU: three matrices
    assert report["lm head"] == 2 * h * config.vocab_size
    plan = memory_plan(config, None, "bf16", 1, 2048)
    assert dict(plan.items)["weights (fp32)"] == 4 * total


# On top of conftest's SMALL: the Llama option, with 2 query heads per key/value head.
LLAMA_RUN = ("model=llama_tiny", "model.n_kv_head=1", "sparsity=static_50", "task.log_every=1", "task.eval_every=4")


def test_pretrain_llama_tiny_sparse_exports_and_resumes_exactly(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = (*LLAMA_RUN, "task.max_steps=6", "task.checkpoint_every=3")
    trainer = Pretraining(make_config(tmp_path / "full", cache_dir, *steps))
    summary = trainer.fit()
    assert isinstance(trainer.model, Llama) and summary.sparsity == pytest.approx(0.5, abs=0.01)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "hf").eval()
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(5))
    trainer.model.eval()
    with torch.no_grad():
        assert (trainer.model(ids)[0] - hf(ids).logits).abs().max() <= TOLERANCE
    zeros = json.loads((tmp_path / "full" / "hf" / SPARSITY_FILE).read_text())["per_tensor"]
    assert all(name.startswith("model.layers.") for name in zeros) and len(zeros) == 7 * 2

    with killed_at_step(monkeypatch, 5):
        Pretraining(make_config(tmp_path / "crashed", cache_dir, *steps)).fit()
    assert ckpt.latest_checkpoint(tmp_path / "crashed").name == "step_000003"
    resumed = Pretraining(make_config(tmp_path / "crashed", cache_dir, *steps, "task.resume=true"))
    resumed.fit()
    assert train_losses(tmp_path / "crashed") == train_losses(tmp_path / "full")  # bit for bit

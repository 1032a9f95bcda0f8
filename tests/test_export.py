"""Hugging Face export/import: logits parity with `transformers`, baked masks, sparsity.json, atomic writes."""

from __future__ import annotations

import json
import logging
import logging.handlers
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, GPTNeoXConfig, PreTrainedTokenizerFast

from modelzoo.data.tokenizer import MODEL_INPUT_NAMES
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.export.hf import (
    SPARSITY_FILE,
    export_hf,
    from_hf_config,
    from_hf_state_dict,
    load_hf,
    to_hf_config,
    to_hf_state_dict,
)
from modelzoo.export.hf_gpt2 import CONV1D_WEIGHT
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.sparsity.plugin import MaskedSparsity

INFO = {"algorithm": "static", "target_sparsity": 0.75, "step": 10}


def tiny_config(activation: str = "gelu_new") -> GPTConfig:
    return GPTConfig(
        name="test", n_layer=2, n_embd=64, n_head=4, n_inner=256, n_positions=64, vocab_size=300, activation=activation
    )


def make_model(activation: str = "gelu_new", sparse: bool = False, seed: int = 0) -> GPT:
    """Tiny GPT with every parameter random (LayerNorms included, so a swapped name shows in the logits)."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(activation))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    if sparse:
        MaskedSparsity(SparsityConfig(sparsity=0.75), seed=0).apply(model)
    return model.eval()


def make_tokenizer(size: int = 100) -> PreTrainedTokenizerFast:
    """Word-level tokenizer built in memory (no downloads): `<|endoftext|>` is id 0, then words w1, w2, ..."""
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        model_input_names=MODEL_INPUT_NAMES,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], tuple[GPT, Path]]:
    """One export per (activation, sparse), shared by the tests of this module."""
    out = {}
    for activation in ("gelu_new", "gelu"):
        for sparse in (False, True):
            model = make_model(activation, sparse)
            directory = tmp_path_factory.mktemp(f"{activation}-{sparse}") / "hf"
            out[activation, sparse] = model, export_hf(model, directory, tokenizer=make_tokenizer(), sparsity_info=INFO)
    return out


def load_hf_model(directory: Path, attn_implementation: str) -> GPT2LMHeadModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attn_implementation)
    except (ValueError, ImportError) as err:
        pytest.skip(f"attn_implementation={attn_implementation!r} does not load: {err}")
    return model.eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse75"])
@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_logits_match_transformers(exported, activation: str, sparse: bool, attn_implementation: str) -> None:
    model, directory = exported[activation, sparse]
    hf_model = load_hf_model(directory, attn_implementation)
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf_model(idx).logits
    assert ours.abs().max() > 1.0  # non-trivial logits, so the comparison means something
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_exported_zeros_exactly_where_masks_are_false(exported) -> None:
    model, directory = exported["gelu_new", True]
    saved = load_file(directory / "model.safetensors")
    masks = {k.removesuffix(MASK_SUFFIX): v for k, v in model.state_dict().items() if k.endswith(MASK_SUFFIX)}
    assert len(masks) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    assert not any(k.endswith(MASK_SUFFIX) for k in saved) and "lm_head.weight" not in saved
    for name, mask in masks.items():
        weight = saved[name].t() if CONV1D_WEIGHT.fullmatch(name) else saved[name]
        assert torch.equal(weight == 0, ~mask), name


def test_sparsity_json_reports_measured_fractions(exported) -> None:
    _, directory = exported["gelu", True]
    report = json.loads((directory / SPARSITY_FILE).read_text())
    saved = load_file(directory / "model.safetensors")
    measured = {name: (saved[name] == 0).float().mean().item() for name in report["per_tensor"]}
    assert report["per_tensor"] == pytest.approx(measured, abs=1e-12)
    assert set(report["per_tensor"].values()) == {0.75}
    assert report["global_sparsity"] == 0.75
    assert report["pattern"] == "unstructured"
    assert {k: report[k] for k in INFO} == INFO
    _, dense_dir = exported["gelu", False]
    dense = json.loads((dense_dir / SPARSITY_FILE).read_text())
    assert dense["per_tensor"] == {} and dense["global_sparsity"] == 0.0


def test_generate_matches_our_greedy_decode_without_warnings(exported) -> None:
    model, directory = exported["gelu_new", True]
    hf_model = load_hf_model(directory, "eager")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert hf_model.config.eos_token_id == hf_model.generation_config.pad_token_id == tokenizer.eos_token_id == 0
    prompt = tokenizer(["w37 w97 w72 w55", "w45 w58 w55 w32"], return_tensors="pt")
    hf_warnings = logging.handlers.BufferingHandler(capacity=100)
    hf_warnings.setLevel(logging.WARNING)
    logging.getLogger("transformers").addHandler(hf_warnings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = hf_model.generate(**prompt, max_new_tokens=8, do_sample=False)
    finally:
        logging.getLogger("transformers").removeHandler(hf_warnings)
    assert [r.getMessage() for r in hf_warnings.buffer] == []
    idx = prompt["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


def test_round_trip_hf_to_ours_is_identical(exported) -> None:
    model, directory = exported["gelu", True]
    loaded = load_hf(directory)
    assert loaded.config == replace(tiny_config("gelu"), name="hf")
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_state_dict_and_config_tables_are_inverse() -> None:
    model = make_model(sparse=True)
    hf_state = to_hf_state_dict(model.state_dict(), model.config)
    assert hf_state.keys() == GPT2LMHeadModel(to_hf_config(model.config)).state_dict().keys() - {"lm_head.weight"}
    back = from_hf_state_dict(hf_state, model.config)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(MASK_SUFFIX)}
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert from_hf_config(to_hf_config(model.config), name="test") == model.config


def test_masks_are_baked_into_weights_not_yet_repruned() -> None:
    model = make_model(sparse=True)
    fc = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        fc.weight.fill_(1.0)  # an update the plug-in has not re-pruned yet
    baked = to_hf_state_dict(model.state_dict(), model.config)["transformer.h.0.mlp.c_fc.weight"]
    assert torch.equal(baked.t() == 0, ~fc.weight_mask)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"activation_function": "relu"}, r"activation_function.*'relu'.*allowed: gelu_new, gelu"),
        ({"attn_pdrop": 0.2}, "one dropout rate"),
    ],
)
def test_unsupported_hf_configs_are_refused(tmp_path: Path, override: dict, match: str) -> None:
    hf_config = to_hf_config(tiny_config())
    for key, value in override.items():
        setattr(hf_config, key, value)
    with pytest.raises(ConfigError, match=match):
        from_hf_config(hf_config)
    hf_config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=match) as refused:
        load_hf(tmp_path)
    assert str(tmp_path / "config.json") in str(refused.value)


def test_load_hf_refuses_missing_directory_other_models_and_untied_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_hf(tmp_path / "absent")
    GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_type 'gpt_neox'"):
        load_hf(tmp_path)
    hf_state = dict(GPT2LMHeadModel(to_hf_config(tiny_config())).state_dict())
    hf_state["lm_head.weight"] = hf_state["lm_head.weight"] + 1.0
    with pytest.raises(CheckpointError, match="untied"):
        from_hf_state_dict(hf_state, tiny_config())


def test_failed_export_leaves_previous_export_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = export_hf(make_model(seed=0), tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(GPT2LMHeadModel, "save_pretrained", fail)
        with pytest.raises(OSError, match="disk full"):
            export_hf(make_model(seed=1), directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary sibling left behind

    export_hf(make_model(seed=1), directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} != before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_sparsity_info_may_not_override_measured_numbers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="global_sparsity"):
        export_hf(make_model(sparse=True), tmp_path / "hf", sparsity_info={"global_sparsity": 0.5})
    assert not (tmp_path / "hf").exists()


def test_export_refuses_tokenizer_larger_than_vocab(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.vocab_size: 300 < the tokenizer's 301 tokens"):
        export_hf(make_model(), tmp_path / "hf", tokenizer=make_tokenizer(301))
    assert not (tmp_path / "hf").exists()

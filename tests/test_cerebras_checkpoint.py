"""Cerebras Model Zoo GPT and Llama checkpoints <-> our models: names, fused q/k/v, Llama's interleaved rotary rows,
`*_mask` buffers, NaN-pruned weights.

Llama parity measured here (fp32, CPU, torch 2.13, 2 shared CPU cores, 2026-12-07): the Model Zoo-convention
forward below, run on their layout, gives our logits to a max abs difference of 4.8e-7 (untied) and 7.2e-7 (tied),
HF's `LlamaForCausalLM` on the layout converted back to 0.0; written without the rotary interleave, their layout
moves those logits by 4.0e-3, 400 times the tolerance 1e-5.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from modelzoo.backends.cerebras.checkpoint import (
    from_cerebras_state_dict,
    import_cerebras,
    load_cerebras_state_dict,
    to_cerebras_state_dict,
)
from modelzoo.backends.cerebras.params import CerebrasRecipe, read_params, write_params
from modelzoo.checkpoint import load_training_state
from modelzoo.cli import main
from modelzoo.config import load_config, to_object
from modelzoo.errors import CheckpointError
from modelzoo.export.hf import load_hf, to_hf_config, to_hf_state_dict
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.models.llama import LlamaConfig, rope_frequencies
from modelzoo.models.registry import CausalLM, ModelConfig, build_model
from modelzoo.restore import restore_model
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.validate import validate
from tests.conftest import make_config

# Layer 0 and the model-level keys of a Cerebras Model Zoo 2.1+ GPT-2/GPT-3 state dict (its HF <-> CS converter).
LAYER = "transformer_decoder.layers.0."
LAYER_MODULES = (  # both families' (Llama adds the SwiGLU gate, `ffn.ffn.0.linear_layer_for_glu`)
    "self_attn.proj_q_dense_layer",
    "self_attn.proj_k_dense_layer",
    "self_attn.proj_v_dense_layer",
    "self_attn.proj_output_dense_layer",
    "norm1",
    "norm3",
    "ffn.ffn.0.linear_layer",
    "ffn.ffn.1.linear_layer",
)
EXPECTED = {
    "embedding_layer.word_embeddings.weight",
    "embedding_layer.position_embeddings.embed.weight",
    "transformer_decoder.norm.weight",
    "transformer_decoder.norm.bias",
    "lm_head.weight",
    *(LAYER + f"{m}.{p}" for m in LAYER_MODULES for p in ("weight", "bias")),
}
STATIC = SparsityConfig(sparsity=0.75, param_filter=["*proj_[qkv]_dense_layer.weight", "*linear_layer.weight"])


LLAMA_PARAMS = Path(__file__).parent / "data" / "cerebras_modelzoo" / "llama_tiny_gqa_llama3_static50.yaml"
TOLERANCE = 1e-5  # fp32 logits; measured at most 7.2e-7 (module docstring)


def llama_config(tied: bool = False) -> LlamaConfig:
    """llama_tiny's shape with GQA (4 query, 2 key/value heads) and Llama-3 scaling, as our Llama params fixture."""
    return replace(read_params(LLAMA_PARAMS).model, tie_word_embeddings=tied)


@pytest.fixture(params=["gpt", "llama"])
def config(request, tiny_config: GPTConfig) -> ModelConfig:
    """Each family's small test model (the Llama with 2 layers and 256 tokens to keep the commands quick)."""
    return tiny_config if request.param == "gpt" else replace(llama_config(), n_layer=2, vocab_size=256)


def sparse_model(config: ModelConfig, sparsity: SparsityConfig = STATIC) -> CausalLM:
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():  # Llama's RMSNorm weights away from 1, so a norm applied to the wrong tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    MaskedSparsity(sparsity, seed=1).apply(model)
    return model.eval()


def test_names_match_the_cerebras_layout_and_qkv_split_follows_their_converter(tiny_config: GPTConfig) -> None:
    model = sparse_model(tiny_config)
    theirs = to_cerebras_state_dict(model.state_dict(), model.config)
    assert {k for k in theirs if ".layers." not in k or k.startswith(LAYER)} - {
        k for k in theirs if k.endswith("_mask")
    } == EXPECTED
    masked = sorted(k.removesuffix("_mask") for k in theirs if k.endswith("_mask") and k.startswith(LAYER))
    assert masked == [
        LAYER + "ffn.ffn.0.linear_layer.weight",
        LAYER + "ffn.ffn.1.linear_layer.weight",
        *(LAYER + f"self_attn.proj_{x}_dense_layer.weight" for x in "kqv"),
    ]
    # Cerebras' converter: q, k, v = chunk(transpose(HF Conv1D c_attn.weight), 3, dim=0).
    hf = to_hf_state_dict(model.state_dict(), model.config)["transformer.h.0.attn.c_attn.weight"]
    q, k, v = torch.chunk(hf.t(), 3, dim=0)
    for x, expected in zip("qkv", (q, k, v), strict=True):
        assert torch.equal(theirs[LAYER + f"self_attn.proj_{x}_dense_layer.weight"], expected)
    fc = LAYER + "ffn.ffn.0.linear_layer.weight"
    assert (theirs[fc][~theirs[fc + "_mask"]] == 0).all() and theirs[fc + "_mask"].float().mean() == 0.25
    assert theirs["lm_head.weight"] is theirs["embedding_layer.word_embeddings.weight"]


@pytest.mark.parametrize("old_format", [False, True])
def test_import_gives_the_same_weights_masks_and_logits(tiny_config: GPTConfig, old_format: bool) -> None:
    model = sparse_model(tiny_config)
    theirs = to_cerebras_state_dict(model.state_dict(), model.config)
    if old_format:  # 1.x: `model.` prefix, 2.0 position name, 1.7's ln_f copy, pruned weights as NaN, no masks
        masks = {k.removesuffix("_mask"): theirs.pop(k) for k in [k for k in theirs if k.endswith("_mask")]}
        for name, mask in masks.items():
            theirs[name] = theirs[name].masked_fill(~mask, float("nan"))
        theirs["embedding_layer.position_embeddings.weight"] = theirs.pop(
            "embedding_layer.position_embeddings.embed.weight"
        )
        theirs["ln_f.weight"] = theirs["transformer_decoder.norm.weight"].clone()
        theirs = {f"model.{k}": v for k, v in theirs.items()}
    state, masks = from_cerebras_state_dict(theirs, tiny_config)
    ours = model.state_dict()
    assert sorted(masks) == sorted(k.removesuffix("_mask") for k in ours if k.endswith("_mask"))
    for name, mask in masks.items():
        assert torch.equal(mask, ours[name + "_mask"])
    for name, value in state.items():
        assert torch.equal(value, ours[name]), name


def test_import_writes_a_checkpoint_that_export_reads(tmp_path: Path, config: ModelConfig) -> None:
    model = sparse_model(config)
    torch.save(
        {"model": to_cerebras_state_dict(model.state_dict(), model.config), "global_step": 7}, tmp_path / "model.mdl"
    )
    params = write_params(CerebrasRecipe(model=config, sparsity=STATIC), tmp_path / "params.yaml")
    path = import_cerebras(params, tmp_path / "model.mdl", tmp_path / "run")
    restored = restore_model(path).model
    idx = torch.randint(0, config.vocab_size, (2, 16))
    torch.testing.assert_close(restored.eval()(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert sorted(k for k in restored.state_dict() if k.endswith("_mask")) == sorted(
        k for k in model.state_dict() if k.endswith("_mask")
    )
    with pytest.raises(CheckpointError, match="holds weights only"):
        load_training_state(path)
    with pytest.raises(CheckpointError, match="already holds checkpoint"):
        import_cerebras(params, tmp_path / "model.mdl", tmp_path / "run")


def test_masks_must_match_the_params_file(tmp_path: Path, tiny_config: GPTConfig) -> None:
    torch.save(to_cerebras_state_dict(sparse_model(tiny_config).state_dict(), tiny_config), tmp_path / "model.pt")
    mlp_only = SparsityConfig(sparsity=0.75, param_filter=["*linear_layer.weight"])
    params = write_params(CerebrasRecipe(model=tiny_config, sparsity=mlp_only), tmp_path / "params.yaml")
    with pytest.raises(CheckpointError, match=r"has masks for \['transformer\.h\.0\.attn\.c_attn\.weight'"):
        import_cerebras(params, tmp_path / "model.pt", tmp_path / "run")


def test_refuses_untied_heads_unknown_tensors_and_hdf5(tmp_path: Path, tiny_config: GPTConfig) -> None:
    theirs = to_cerebras_state_dict(GPT(tiny_config).state_dict(), tiny_config)
    untied = {**theirs, "lm_head.weight": theirs["lm_head.weight"] + 1}
    with pytest.raises(CheckpointError, match="untied heads cannot be imported"):
        from_cerebras_state_dict(untied, tiny_config)
    with pytest.raises(CheckpointError, match=r"no place for: \['rotary\.inv_freq'\]"):
        from_cerebras_state_dict({**theirs, "rotary.inv_freq": torch.ones(4)}, tiny_config)
    del theirs["transformer_decoder.layers.1.norm3.bias"]
    with pytest.raises(CheckpointError, match=r"has no transformer_decoder\.layers\.1\.norm3\.bias"):
        from_cerebras_state_dict(theirs, tiny_config)
    (tmp_path / "c.mdl").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError, match=r"cstorch\.save HDF5 file"):
        load_cerebras_state_dict(tmp_path / "c.mdl")


@pytest.mark.parametrize(
    ("name", "seq_len", "max_steps", "batch_size"),
    [("gpt3_125m_rigl75_v22.yaml", 2048, 4778, 256), ("llama_tiny_gqa_llama3_static50.yaml", 128, 100, 8)],
)
def test_import_cerebras_command_writes_config_options_that_compose(
    tmp_path: Path, capsys, name: str, seq_len: int, max_steps: int, batch_size: int
) -> None:
    params = Path(__file__).parent / "data" / "cerebras_modelzoo" / name
    main(["import-cerebras", str(params), str(tmp_path / "out")])
    command = capsys.readouterr().out.splitlines()[1].split()
    assert command[:2] == ["modelzoo", "pretrain"]
    cfg = to_object(load_config(["task=pretrain", *command[2:]]))
    validate(cfg)
    recipe = read_params(params)
    assert (cfg.model, cfg.sparsity, cfg.optim, cfg.data.seq_len) == (
        recipe.model,
        recipe.sparsity,
        recipe.optim,
        seq_len,
    )
    assert (cfg.task.max_steps, cfg.task.batch_size) == (max_steps, batch_size)


def test_checkpoint_round_trip_through_both_commands(tmp_path: Path, config: ModelConfig, capsys) -> None:
    model = sparse_model(config)
    theirs = to_cerebras_state_dict(model.state_dict(), model.config)
    torch.save(theirs, tmp_path / "model.pt")
    params = write_params(CerebrasRecipe(model=config, sparsity=STATIC), tmp_path / "params.yaml")
    run = tmp_path / "run"
    main(["import-cerebras", str(params), str(run), str(tmp_path / "model.pt")])
    main(["export", f"run_dir={run}", f"task.output_dir={tmp_path / 'hf'}"])
    idx = torch.randint(0, config.vocab_size, (2, 16))
    torch.testing.assert_close(load_hf(tmp_path / "hf")(idx)[0], model(idx)[0], rtol=0, atol=1e-6)
    main(["export-cerebras", f"run_dir={run}", f"task.output_dir={tmp_path / 'cs'}"])
    assert "exported" in capsys.readouterr().out
    again = load_cerebras_state_dict(tmp_path / "cs" / "model.mdl")
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], v) for k, v in theirs.items())
    assert read_params(tmp_path / "cs" / "params.yaml").sparsity == read_params(params).sparsity


def test_an_imported_checkpoint_continues_training_with_its_masks(tmp_path: Path, cache_dir: Path) -> None:
    config = GPTConfig(name="small", n_layer=2, n_embd=64, n_head=2, n_inner=256, n_positions=64, vocab_size=1024)
    model = sparse_model(config)
    torch.save(to_cerebras_state_dict(model.state_dict(), model.config), tmp_path / "model.pt")
    params = write_params(CerebrasRecipe(model=config, sparsity=STATIC), tmp_path / "params.yaml")
    import_cerebras(params, tmp_path / "model.pt", tmp_path / "imported")
    main(["export", f"run_dir={tmp_path / 'imported'}"])
    trainer = Pretraining(
        make_config(
            tmp_path / "continued",
            cache_dir,
            f"task.init_from={tmp_path / 'imported' / 'hf'}",
            "sparsity.init_method=from_weights",
            "sparsity.param_filter=['*proj_[qkv]_dense_layer.weight','*linear_layer.weight']",
            "task.max_steps=2",
            "task.export=false",
        )
    )
    masks = {k: v for k, v in model.state_dict().items() if k.endswith("_mask")}
    assert {k: v for k, v in trainer.model.state_dict().items() if k.endswith("_mask")}.keys() == masks.keys()
    trainer.fit()
    for key, mask in masks.items():
        assert torch.equal(trainer.model.get_buffer(key), mask)
        assert (trainer.model.get_parameter(key.removesuffix("_mask"))[~mask] == 0).all()


# ---- Llama -------------------------------------------------------------------------------------------------------
# Layer 0 and the model-level keys of a Model Zoo 2.1+ Llama state dict (its HF <-> CS Llama converter); no biases.
LLAMA_EXPECTED = {
    "embedding_layer.word_embeddings.weight",
    "transformer_decoder.norm.weight",
    "lm_head.weight",
    *(LAYER + f"{m}.weight" for m in (*LAYER_MODULES, "ffn.ffn.0.linear_layer_for_glu")),
}


def their_interleave(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Their converter's HF -> CS step for q/k rows: per head, [x0..x(n-1), y0..y(n-1)] -> [x0, y0, x1, y1, ...]."""
    t = t.view(heads, -1, t.shape[-1])
    return t.reshape(heads, 2, -1, t.shape[-1]).permute(0, 2, 1, 3).reshape(-1, t.shape[-1])


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """The Model Zoo's rotary pairing (RotaryPositionEmbeddingHelper): adjacent entries (2i, 2i + 1) are a pair."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def their_llama_logits(theirs: dict[str, torch.Tensor], config: LlamaConfig, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of the Model Zoo's Llama computed from its own state dict, after its source: pre-RMSNorm
    blocks; q and k rotated by `rotate_every_two` with each (Llama-3 scaled) frequency repeated for an adjacent pair;
    key/value groups expanded over consecutive query heads (`expand_kv_over_group_dim`); scores scaled by
    1/sqrt(head_dim); `swiglu(linear_layer(x), linear_layer_for_glu(x)) = linear_layer(x) * silu(for_glu(x))`."""
    B, T = idx.shape
    nh, nkv, hs = config.n_head, config.n_kv_head, config.head_dim

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return theirs[name] * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ theirs[name + ".weight"].t()

    angle = torch.arange(T).float()[:, None] * rope_frequencies(config).repeat_interleave(2)  # (T, hs)
    cos, sin = angle.cos(), angle.sin()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = theirs["embedding_layer.word_embeddings.weight"][idx]  # (B, T, C)
    for i in range(config.n_layer):
        at = f"transformer_decoder.layers.{i}."
        h = norm(x, at + "norm1.weight")
        q = linear(h, at + "self_attn.proj_q_dense_layer").view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = linear(h, at + "self_attn.proj_k_dense_layer").view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = linear(h, at + "self_attn.proj_v_dense_layer").view(B, T, nkv, hs).transpose(1, 2)
        q, k = q * cos + rotate_every_two(q) * sin, k * cos + rotate_every_two(k) * sin
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, T, hs)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf"))  # (B, nh, T, T)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hs)
        x = x + linear(y, at + "self_attn.proj_output_dense_layer")
        h = norm(x, at + "norm3.weight")
        ffn = linear(h, at + "ffn.ffn.0.linear_layer") * F.silu(linear(h, at + "ffn.ffn.0.linear_layer_for_glu"))
        x = x + linear(ffn, at + "ffn.ffn.1.linear_layer")
    return linear(norm(x, "transformer_decoder.norm.weight"), "lm_head")


def test_llama_names_and_rotary_interleave_follow_their_converter() -> None:
    config = llama_config()
    ours = sparse_model(config, read_params(LLAMA_PARAMS).sparsity).state_dict()
    theirs = to_cerebras_state_dict(ours, config)
    weights = {k for k in theirs if (".layers." not in k or k.startswith(LAYER)) and not k.endswith("_mask")}
    assert weights == LLAMA_EXPECTED
    assert sorted(k.removesuffix("_mask") for k in theirs if k.endswith("_mask") and k.startswith(LAYER)) == [
        LAYER + "ffn.ffn.0.linear_layer.weight",
        LAYER + "ffn.ffn.0.linear_layer_for_glu.weight",
        *(LAYER + f"self_attn.proj_{x}_dense_layer.weight" for x in "kqv"),
    ]
    for x, heads in (("q", config.n_head), ("k", config.n_kv_head)):
        name, ours_name = LAYER + f"self_attn.proj_{x}_dense_layer.weight", f"model.layers.0.self_attn.{x}_proj.weight"
        assert torch.equal(theirs[name], their_interleave(ours[ours_name], heads))
        assert torch.equal(theirs[name + "_mask"], their_interleave(ours[ours_name + "_mask"], heads))
    v = LAYER + "self_attn.proj_v_dense_layer.weight"  # v is not rotated: a plain rename
    assert torch.equal(theirs[v], ours["model.layers.0.self_attn.v_proj.weight"])
    assert torch.equal(theirs["lm_head.weight"], ours["lm_head.weight"])  # untied: its own tensor
    assert not torch.equal(theirs["lm_head.weight"], theirs["embedding_layer.word_embeddings.weight"])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_both_ways_keeps_weights_masks_and_logits(tied: bool) -> None:
    config = llama_config(tied)
    model = sparse_model(config, read_params(LLAMA_PARAMS).sparsity)
    ours = model.state_dict()
    theirs = to_cerebras_state_dict(ours, config)
    assert (theirs["lm_head.weight"] is theirs["embedding_layer.word_embeddings.weight"]) == tied
    idx = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx)[0]
        # their layout, run in their conventions, computes our logits
        assert (their_llama_logits(theirs, config, idx) - logits).abs().max() <= TOLERANCE
        # theirs (1.x `model.` prefix) -> ours: the same weights and masks, exactly
        state, masks = from_cerebras_state_dict({f"model.{k}": v for k, v in theirs.items()}, config)
        assert sorted(f"{n}_mask" for n in masks) == sorted(k for k in ours if k.endswith("_mask"))
        assert all(torch.equal(masks[n], ours[f"{n}_mask"]) for n in masks)
        assert state.keys() == {k for k in ours if not k.endswith("_mask")}
        assert all(torch.equal(state[k], ours[k]) for k in state)
        # theirs -> HF LlamaForCausalLM
        hf = LlamaForCausalLM(to_hf_config(config)).eval()
        hf.load_state_dict(to_hf_state_dict(state, config), strict=not tied)
        assert (hf(idx).logits - logits).abs().max() <= TOLERANCE


def test_llama_refuses_a_head_unlike_its_tied_embeddings_and_missing_tensors(tiny_config: GPTConfig) -> None:
    tied = replace(llama_config(tied=True), n_layer=1, vocab_size=64)
    theirs = to_cerebras_state_dict(sparse_model(tied).state_dict(), tied)
    with pytest.raises(CheckpointError, match="untied heads cannot be imported"):
        from_cerebras_state_dict({**theirs, "lm_head.weight": theirs["lm_head.weight"] + 1}, tied)
    untied = replace(tied, tie_word_embeddings=False)
    theirs = to_cerebras_state_dict(sparse_model(untied).state_dict(), untied)
    with pytest.raises(CheckpointError, match=r"has no embedding_layer\.position_embeddings\.weight"):
        from_cerebras_state_dict(theirs, tiny_config)  # a Llama checkpoint with GPT params
    del theirs["lm_head.weight"]
    with pytest.raises(CheckpointError, match=r"has no lm_head\.weight \(needed for our lm_head\.weight\)"):
        from_cerebras_state_dict(theirs, untied)

"""Cerebras Model Zoo GPT checkpoints <-> our model: names, fused q/k/v, `*_mask` buffers, NaN-pruned weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
from modelzoo.export.hf import load_hf, to_hf_state_dict
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.restore import restore_model
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plugin import MaskedSparsity
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.validate import validate
from tests.conftest import make_config

# Layer 0 and the model-level keys of a Cerebras Model Zoo 2.1+ GPT-2/GPT-3 state dict (its HF <-> CS converter).
LAYER = "transformer_decoder.layers.0."
EXPECTED = {
    "embedding_layer.word_embeddings.weight",
    "embedding_layer.position_embeddings.embed.weight",
    "transformer_decoder.norm.weight",
    "transformer_decoder.norm.bias",
    "lm_head.weight",
    *(
        LAYER + f"{m}.{p}"
        for m in (
            "self_attn.proj_q_dense_layer",
            "self_attn.proj_k_dense_layer",
            "self_attn.proj_v_dense_layer",
            "self_attn.proj_output_dense_layer",
            "norm1",
            "norm3",
            "ffn.ffn.0.linear_layer",
            "ffn.ffn.1.linear_layer",
        )
        for p in ("weight", "bias")
    ),
}
STATIC = SparsityConfig(sparsity=0.75, param_filter=["*proj_[qkv]_dense_layer.weight", "*linear_layer.weight"])


def sparse_model(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(config)
    MaskedSparsity(STATIC, seed=1).apply(model)
    return model.eval()


def test_names_match_the_cerebras_layout_and_qkv_split_follows_their_converter(tiny_config: GPTConfig) -> None:
    model = sparse_model(tiny_config)
    theirs = to_cerebras_state_dict(model.state_dict())
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
    theirs = to_cerebras_state_dict(model.state_dict())
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


def test_import_writes_a_checkpoint_that_export_reads(tmp_path: Path, tiny_config: GPTConfig) -> None:
    model = sparse_model(tiny_config)
    torch.save({"model": to_cerebras_state_dict(model.state_dict()), "global_step": 7}, tmp_path / "model.mdl")
    params = write_params(CerebrasRecipe(model=tiny_config, sparsity=STATIC), tmp_path / "params.yaml")
    path = import_cerebras(params, tmp_path / "model.mdl", tmp_path / "run")
    restored = restore_model(path).model
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    torch.testing.assert_close(restored.eval()(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert sorted(k for k in restored.state_dict() if k.endswith("_mask")) == sorted(
        k for k in model.state_dict() if k.endswith("_mask")
    )
    with pytest.raises(CheckpointError, match="holds weights only"):
        load_training_state(path)
    with pytest.raises(CheckpointError, match="already holds checkpoint"):
        import_cerebras(params, tmp_path / "model.mdl", tmp_path / "run")


def test_masks_must_match_the_params_file(tmp_path: Path, tiny_config: GPTConfig) -> None:
    torch.save(to_cerebras_state_dict(sparse_model(tiny_config).state_dict()), tmp_path / "model.pt")
    mlp_only = SparsityConfig(sparsity=0.75, param_filter=["*linear_layer.weight"])
    params = write_params(CerebrasRecipe(model=tiny_config, sparsity=mlp_only), tmp_path / "params.yaml")
    with pytest.raises(CheckpointError, match=r"has masks for \['transformer\.h\.0\.attn\.c_attn\.weight'"):
        import_cerebras(params, tmp_path / "model.pt", tmp_path / "run")


def test_refuses_untied_heads_unknown_tensors_and_hdf5(tmp_path: Path, tiny_config: GPTConfig) -> None:
    theirs = to_cerebras_state_dict(GPT(tiny_config).state_dict())
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


def test_import_cerebras_command_writes_config_options_that_compose(tmp_path: Path, capsys) -> None:
    params = Path(__file__).parent / "data" / "cerebras_modelzoo" / "gpt3_125m_rigl75_v22.yaml"
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
        2048,
    )
    assert (cfg.task.max_steps, cfg.task.batch_size) == (4778, 256)


def test_checkpoint_round_trip_through_both_commands(tmp_path: Path, tiny_config: GPTConfig, capsys) -> None:
    model = sparse_model(tiny_config)
    theirs = to_cerebras_state_dict(model.state_dict())
    torch.save(theirs, tmp_path / "model.pt")
    params = write_params(CerebrasRecipe(model=tiny_config, sparsity=STATIC), tmp_path / "params.yaml")
    run = tmp_path / "run"
    main(["import-cerebras", str(params), str(run), str(tmp_path / "model.pt")])
    main(["export", f"run_dir={run}", f"task.output_dir={tmp_path / 'hf'}"])
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    torch.testing.assert_close(load_hf(tmp_path / "hf")(idx)[0], model(idx)[0], rtol=0, atol=1e-6)
    main(["export-cerebras", f"run_dir={run}", f"task.output_dir={tmp_path / 'cs'}"])
    assert "exported" in capsys.readouterr().out
    again = load_cerebras_state_dict(tmp_path / "cs" / "model.mdl")
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], v) for k, v in theirs.items())
    assert read_params(tmp_path / "cs" / "params.yaml").sparsity == read_params(params).sparsity


def test_an_imported_checkpoint_continues_training_with_its_masks(tmp_path: Path, cache_dir: Path) -> None:
    config = GPTConfig(name="small", n_layer=2, n_embd=64, n_head=2, n_inner=256, n_positions=64, vocab_size=1024)
    model = sparse_model(config)
    torch.save(to_cerebras_state_dict(model.state_dict()), tmp_path / "model.pt")
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

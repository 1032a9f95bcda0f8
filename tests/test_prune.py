"""One-shot pruning: exact targets, SparseGPT's reconstruction, sequential feeding, dampening retries, the HF and
checkpoint hand-offs to sparse continued pre-training, and the refusals of the `prune` command."""

from __future__ import annotations

import copy
import importlib
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from modelzoo import checkpoint as ckpt
from modelzoo.cli import main
from modelzoo.config.prune import PruneConfig
from modelzoo.export.hf import SPARSITY_FILE, load_hf, restore_masks
from modelzoo.models.gpt import GPT
from modelzoo.prune.hessian import HessianError, InputStats, inverse_cholesky, relative_error
from modelzoo.prune.io import load_causal_lm, save_pruned
from modelzoo.prune.layers import select_layers
from modelzoo.prune.magnitude import magnitude_mask
from modelzoo.prune.sequential import prune_model
from modelzoo.prune.sparsegpt import sparsegpt
from modelzoo.restore import restore_model
from modelzoo.sparsity.masks import MASK_SUFFIX, num_kept
from modelzoo.tasks.pretrain import Pretraining
from tests.conftest import make_config
from tests.test_export import make_tokenizer

TARGETS = {"50%": {"sparsity": 0.5}, "70%": {"sparsity": 0.7}, "2:4": {"n_m": [2, 4]}}


def calibration(vocab_size: int, samples: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab_size, (samples, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_every_layer_hits_the_target_exactly(tiny_model: GPT, method: str, target: str) -> None:
    config = PruneConfig(method=method, **TARGETS[target])
    result = prune_model(tiny_model, calibration(tiny_model.config.vocab_size), config)
    assert len(result.masks) == 4 * tiny_model.config.n_layer
    for name, mask in result.masks.items():
        weight = tiny_model.get_parameter(name)
        assert torch.equal(weight != 0, mask), name
        if config.pattern is None:
            assert int((weight == 0).sum()) == weight.numel() - num_kept(weight.numel(), config.level), name
            if method == "wanda":  # compared within each output row
                per_row = (weight == 0).sum(dim=1)
                assert int(per_row.max() - per_row.min()) <= 1, name
        else:
            groups = (weight != 0).reshape(weight.shape[0], -1, 4)  # (out, in/4, 4)
            assert bool((groups.sum(-1) == 2).all()), name


def test_sparsegpt_reconstructs_a_linear_layer_better_than_magnitude() -> None:
    torch.manual_seed(0)
    # Correlated inputs of very different scales, as in a trained network; W (out, in).
    X = torch.randn(2048, 128) @ torch.randn(128, 128) * torch.logspace(-1, 1, 128)
    W = torch.randn(64, 128)
    stats = InputStats(128)
    stats.add(X)
    H = stats.hessian()

    def error(pruned: torch.Tensor) -> float:
        return float(torch.linalg.norm(X @ (W - pruned).T) / torch.linalg.norm(X @ W.T))

    magnitude = error(W * magnitude_mask(W, 0.5))
    obs = sparsegpt(W, H, 0.5)
    mask_only = sparsegpt(W, H, 0.5, update_weights=False)
    assert error(obs.weight) < 0.5 * magnitude
    assert error(obs.weight) < error(mask_only.weight)
    assert torch.equal(mask_only.weight, W * mask_only.mask)  # the mask-only variant leaves kept weights alone
    assert int(obs.mask.sum()) == int(mask_only.mask.sum()) == 64 * 64
    assert relative_error(W, obs.weight, H) == pytest.approx(error(obs.weight), rel=1e-3)  # the Hessian shortcut


def test_each_block_is_calibrated_on_the_pruned_outputs_of_the_one_before(tiny_model: GPT) -> None:
    tokens = calibration(tiny_model.config.vocab_size)
    config = PruneConfig(batch_size=4)
    dense = copy.deepcopy(tiny_model)
    seen: list[torch.Tensor] = []
    handle = tiny_model.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    prune_model(tiny_model, tokens, config)
    handle.remove()

    def block0_output(model: GPT) -> torch.Tensor:
        x = tokens[: config.batch_size]
        pos = torch.arange(x.shape[1])
        with torch.no_grad():
            return model.transformer.h[0](model.transformer.wte(x) + model.transformer.wpe(pos))

    torch.testing.assert_close(seen[0], block0_output(tiny_model), rtol=0, atol=1e-6)
    assert not torch.allclose(seen[0], block0_output(dense), atol=1e-3)


def test_a_singular_hessian_is_retried_with_more_dampening(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    stats = InputStats(16)
    stats.add(torch.cat([x, x], dim=1))  # duplicated input features: X Xᵀ is singular
    with caplog.at_level(logging.WARNING, logger="modelzoo.prune.hessian"):
        result = sparsegpt(torch.randn(32, 16), stats.hessian(), 0.5, block_size=8, dampening=1e-9)
    assert result.dampening > 1e-9 and "Cholesky factorisation failed at dampening 1e-09" in caplog.text
    assert int(result.mask.sum()) == 32 * 8 and torch.isfinite(result.weight).all()
    with pytest.raises(HessianError, match="not positive definite"):
        inverse_cholesky(torch.full((4, 4), float("nan")), 0.01)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_in_hf_out_keeps_the_masked_logits(tmp_path: Path, family: str) -> None:
    torch.manual_seed(0)
    if family == "gpt2":  # Conv1D layers store (in, out)
        model = GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=100, bos_token_id=0, eos_token_id=0)
        )
    else:
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            vocab_size=100,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    model, tokenizer = load_causal_lm(tmp_path / "src")
    result = prune_model(model, calibration(100), PruneConfig(method="sparsegpt", sparsity=0.5))
    assert len(result.masks) == (4 if family == "gpt2" else 7) * 2
    x = calibration(100, samples=2)
    with torch.no_grad():
        expected = model(x).logits
    out = save_pruned(model, tmp_path / "out", tokenizer, result.masks, {"method": "one-shot sparsegpt"})

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=1e-5)
    for name, mask in result.masks.items():
        assert torch.equal(loaded.get_parameter(name) != 0, mask), name
    report = json.loads((out / SPARSITY_FILE).read_text())
    assert set(report["per_tensor"]) == set(result.masks) and report["global_sparsity"] == pytest.approx(0.5)
    if family == "gpt2":  # what `modelzoo pretrain task.init_from=...` and `modelzoo generate task.hf_dir=...` read
        ours = load_hf(out)
        assert sorted(restore_masks(ours, out)) == sorted(result.masks)
        for name, mask in result.masks.items():
            assert torch.equal(ours.get_buffer(name + MASK_SUFFIX), mask.T), name


def test_masks_from_weights_survive_continued_pretraining_and_its_checkpoint(tmp_path: Path, cache_dir: Path) -> None:
    overrides = ("sparsity.sparsity=0.5", "sparsity.init_method=from_weights", "task.max_steps=2", "task.export=false")
    shape = make_config(tmp_path / "shape", cache_dir).model
    torch.manual_seed(0)
    dense = GPT(shape)
    result = prune_model(dense, calibration(shape.vocab_size), PruneConfig(method="wanda", sparsity=0.5))
    pruned = save_pruned(dense, tmp_path / "pruned", None, result.masks, {"method": "one-shot wanda"})

    trainer = Pretraining(make_config(tmp_path / "run", cache_dir, f"task.init_from={pruned}", *overrides))
    assert {sp.name: sp.mask for sp in trainer.sparsifier.params}.keys() == result.masks.keys()
    for sp in trainer.sparsifier.params:
        assert torch.equal(sp.mask, result.masks[sp.name]), sp.name
    trainer.fit()
    restored = restore_model(ckpt.latest_checkpoint(tmp_path / "run")).model
    state = restored.state_dict()
    for name, mask in result.masks.items():
        assert torch.equal(state[name + MASK_SUFFIX], mask), name
        assert not state[name][~mask].any(), name


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("dense")
    Pretraining(make_config(run, cache_dir, "sparsity=dense", "task.max_steps=1", "task.export=false")).fit()
    return run


def prune_cli(run: Path, cache_dir: Path, *overrides: str) -> None:
    main(["prune", f"run_dir={run}", f"data.cache_dir={cache_dir}", "model.n_positions=64", *overrides])


def test_prune_command_writes_a_sparse_hf_directory(dense_run: Path, cache_dir: Path, capsys) -> None:
    prune_cli(dense_run, cache_dir, "task.n_m=[2,4]", "task.calibration_samples=4", "task.param_filter=*mlp*")
    out = dense_run / "pruned" / "sparsegpt-2of4"
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed
    # the next command names a run directory of its own (without one it would target runs/tiny-static_75)
    assert f"sparsity.init_method=from_weights run_dir={out}-continued" in printed
    report = json.loads((out / SPARSITY_FILE).read_text())
    assert report["pattern"] == "2:4" and report["calibration_samples"] == 4
    mlp = [f"transformer.h.{i}.mlp.{n}.weight" for i in (0, 1) for n in ("c_fc", "c_proj")]
    assert sorted(report["per_tensor"]) == sorted(report["reconstruction_error"]) == mlp
    assert all(v == 0.5 for v in report["per_tensor"].values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.sparsity=1.0", "task.sparsity: 1.0 is outside [0, 1)"),
        ("task.sparsity=-0.1", "task.sparsity: -0.1 is outside [0, 1)"),
        ("task.n_m=[4,4]", "task.n_m: N:M keeps n of every m weights and needs integers 0 < n < m"),
        ("task.method=obs", "task.method: unknown 'obs'"),
        ("task.calibration_samples=0", "task.calibration_samples: must be at least 1"),
        ("task.param_filter=*wte*", "task.param_filter: ['*wte*'] selects no linear weight"),
        ("task.calibration_samples=1000000", "task.calibration_samples: "),
    ],
)
def test_bad_inputs_fail_before_any_pruning(
    dense_run: Path, cache_dir: Path, override: str, message: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelzoo.tasks.prune.prune_model", pytest.fail)
    with pytest.raises(SystemExit) as exit_info:
        prune_cli(dense_run, cache_dir, override)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_select_layers_takes_block_linears_only() -> None:
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    )
    names = [layer.name for layer in select_layers(model, None)[0]]  # the default filter also matches embed_tokens
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
    assert names == [f"model.layers.0.{n}.weight" for n in (*linears, "mlp.up_proj", "mlp.down_proj")]


def test_prune_benchmark_measures_and_reports(monkeypatch: pytest.MonkeyPatch, tiny_config) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    bench = importlib.import_module("prune")
    shape = bench.Shape(tiny_config, samples=2, seq=16, batch_size=2, methods=("magnitude",))
    result = bench.measure(shape, "magnitude", threads=torch.get_num_threads())
    assert result.sparsity == 0.5 and result.peak_rss >= result.rss_before > 0 and result.seconds > 0
    text = bench.report("test", shape, {"magnitude": result})
    assert "| magnitude |" in text and f"{result.pruned_weights / 1e6:.1f}M of" in text

"""Decoding: the KV cache changes no token, greedy equals `transformers`' generate, sampling is seeded, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from modelzoo.cli import main
from modelzoo.errors import ConfigError
from modelzoo.export.hf import export_hf
from modelzoo.generate import Sampling, filter_logits, generate
from modelzoo.inference import load_for_inference
from modelzoo.models.common import KVCache
from modelzoo.models.gpt import GPT
from tests.test_export import make_model, make_tokenizer

PROMPT = [37, 97, 72, 55, 45]


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model(sparse=True)


def test_cache_gives_the_logits_of_a_full_forward(model: GPT) -> None:
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, batch_size=2, max_len=32)
    with torch.no_grad():
        full, _ = model(idx)
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 12), (12, 13), (13, 30))]  # prefill, 1, chunk
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_cached_greedy_equals_recomputing_the_whole_context(model: GPT) -> None:
    cached = generate(model, PROMPT, 24, use_cache=True)
    full = generate(model, PROMPT, 24, use_cache=False)
    assert cached.tokens == full.tokens and len(cached.tokens) == 24
    assert cached.tokens_per_s > 0 and cached.prompt_tokens == len(PROMPT)


def test_greedy_equals_transformers_generate_on_the_export(tmp_path: Path, model: GPT) -> None:
    directory = export_hf(model, tmp_path / "hf", tokenizer=make_tokenizer())
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.tensor([PROMPT])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    loaded = load_for_inference(directory, "task.hf_dir", "cpu", "fp32", "torch_sparse", tokens=1)
    assert loaded.kind == "hf (ours)"  # masks recovered from sparsity.json, layers converted
    for ours in (model, loaded.model):
        result = generate(ours, PROMPT, 30, eos_token_id=loaded.tokenizer.eos_token_id)
        assert PROMPT + result.tokens == expected[0].tolist()


def test_sampling_is_reproducible_by_seed(model: GPT) -> None:
    sampling = Sampling(temperature=1.0, top_k=50, top_p=0.9)
    first, again, other = (generate(model, PROMPT, 20, sampling, seed=s).tokens for s in (7, 7, 8))
    assert first == again and first != other


def test_stops_after_eos(model: GPT) -> None:
    greedy = generate(model, PROMPT, 10).tokens
    assert generate(model, PROMPT, 10, eos_token_id=greedy[2]).tokens == greedy[: greedy.index(greedy[2]) + 1]


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.tensor([0.1, 0.4, 0.2, 0.3]).log()
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [True, False, True, False]
    assert torch.isinf(filter_logits(logits, top_p=0.69)).tolist() == [True, False, True, False]  # 0.4 + 0.3
    assert torch.isinf(filter_logits(logits, top_p=0.71)).tolist() == [True, False, False, False]


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.9), (50, 0.5)])
def test_filter_logits_equals_transformers_warpers(top_k: int, top_p: float) -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(top_k)) * 3
    expected = logits[None]
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(torch.isinf(filter_logits(logits, top_k, top_p)), torch.isinf(expected[0]))


def test_refuses_more_tokens_than_positions(model: GPT) -> None:
    with pytest.raises(ConfigError, match=r"task\.max_new_tokens"):
        generate(model, PROMPT, model.config.n_positions)


def test_cli_generates_from_a_trained_run(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = trained_run
    capsys.readouterr()
    main(
        [
            "generate",
            f"run_dir={run}",
            "task.prompt=The patient",
            "task.max_new_tokens=6",
            "task.converter=torch_sparse",
        ]
    )
    text, speed = capsys.readouterr().out.strip().rsplit("\n", 1)
    assert text.startswith("The patient") and "new tokens in" in speed and "tokens/s" in speed
    with pytest.raises(SystemExit) as info:
        main(["generate", f"run_dir={run}", "task.top_p=0"])
    assert info.value.code == 2 and "task.top_p" in capsys.readouterr().err

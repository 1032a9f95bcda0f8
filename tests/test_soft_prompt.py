"""Soft prompting: the prefix path of our GPT, prompt inits, PEFT adapter round trip with equal logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from modelzoo.export.hf import export_hf
from modelzoo.export.peft import load_prompt_adapter, save_prompt_adapter
from modelzoo.export.seq_cls import export_seq_cls
from modelzoo.models.classifier import Classifier
from modelzoo.models.gpt import GPT
from modelzoo.models.soft_prompt import PromptedLM, SoftPrompt, freeze


def vocab_prompt(model: GPT, n: int = 5) -> SoftPrompt:
    prompt = SoftPrompt(n, model.config.n_embd)
    prompt.init_from_vocab(model.transformer.wte.weight, torch.Generator().manual_seed(0))
    return prompt


def test_prefix_of_token_embeddings_equals_those_tokens(tiny_model: GPT) -> None:
    ids = torch.randint(300, (2, 12), generator=torch.Generator().manual_seed(1))
    prefix = tiny_model.transformer.wte(ids[:, :4])
    with torch.no_grad():
        full, _ = tiny_model(ids)
        prefixed, _ = tiny_model(ids[:, 4:], prefix=prefix)
    torch.testing.assert_close(prefixed, full)


def test_prompt_inits_copy_vocabulary_rows(tiny_model: GPT) -> None:
    wte = tiny_model.transformer.wte.weight
    prompt = SoftPrompt(5, wte.shape[1])
    prompt.init_from_text(wte, [7, 8])
    torch.testing.assert_close(prompt.embedding, wte[[7, 8, 7, 8, 7]])
    sampled = vocab_prompt(tiny_model).embedding
    assert all(any(torch.equal(row, w) for w in wte) for row in sampled)
    with pytest.raises(ValueError, match="no tokens"):
        prompt.init_from_text(wte, [])


def test_training_changes_only_the_prompt(tiny_model: GPT) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    freeze(tiny_model)
    lm = PromptedLM(tiny_model, vocab_prompt(tiny_model))
    start = lm.prompt.embedding.detach().clone()
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(300, (4, 16), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        _, loss = lm(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == ["prompt.embedding"]
    assert not torch.equal(lm.prompt.embedding, start)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_peft_loads_causal_lm_adapter_with_equal_logits(tiny_model: GPT, tmp_path: Path) -> None:
    tiny_model.eval()
    prompt = vocab_prompt(tiny_model)
    base = export_hf(tiny_model, tmp_path / "hf")
    adapter = save_prompt_adapter(prompt, tmp_path / "adapter", tiny_model.config, "causal_lm", base)
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter).eval()
    assert peft_model.peft_config["default"].peft_type.value == "PROMPT_TUNING"
    ids = torch.randint(300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[:, prompt.num_virtual_tokens :]
        ours, _ = PromptedLM(tiny_model, load_prompt_adapter(adapter)[0])(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_peft_loads_seq_cls_adapter_with_equal_logits(tiny_model: GPT, tmp_path: Path) -> None:
    torch.manual_seed(4)
    classifier = Classifier(tiny_model, 10, pad_token_id=0, prompt=vocab_prompt(tiny_model)).eval()
    base = export_seq_cls(classifier, tmp_path / "hf", [f"label {i}" for i in range(10)])
    # The head goes into the adapter too: a base model with a different head still gives our logits.
    with torch.no_grad():
        classifier.score.weight.mul_(-2)
    score = classifier.score.weight
    adapter = save_prompt_adapter(
        classifier.prompt, tmp_path / "a", tiny_model.config, "seq_cls", base, score_weight=score
    )
    hf_model = GPT2ForSequenceClassification.from_pretrained(base)
    peft_model = PeftModel.from_pretrained(hf_model, adapter).eval()
    ids = torch.randint(1, 300, (3, 17), generator=torch.Generator().manual_seed(5))  # no padding: PEFT pools -1
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        ours = classifier(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

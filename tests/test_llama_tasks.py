"""The Llama family through the zoo's commands: `generate` and `evaluate` (checkpoint, HF export, `torch_sparse`)
on a sparse `llama_tiny` run trained here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from modelzoo.backends.torch_sparse import SparseLinear
from modelzoo.config import load_config, to_object
from modelzoo.downstream.evaluate import evaluate_pubmedqa, hf_logits, load_model
from modelzoo.downstream.pubmedqa import load_pubmedqa
from modelzoo.inference import load_for_inference
from modelzoo.models.llama import Llama
from modelzoo.tasks import generate
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.validate import validated_config
from tests.conftest import make_config, needs_shared
from tests.test_downstream_data import PQA

# conftest's SMALL as a Llama (2 query heads share 1 key/value head), 50% static sparsity, 2 steps.
LLAMA = ("model=llama_tiny", "model.n_kv_head=1", "sparsity=static_50")
LLAMA_STEPS = ("task.max_steps=2", "task.eval_every=2", "task.checkpoint_every=2")
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A finished sparse Llama run with its checkpoint and `hf/` export; read only."""
    run = tmp_path_factory.mktemp("llama") / "run"
    trainer = Pretraining(make_config(run, cache_dir, *LLAMA, *LLAMA_STEPS))
    trainer.fit()
    assert isinstance(trainer.model, Llama)
    return run


def generated(*overrides: str) -> list[int]:
    """The greedy tokens `modelzoo generate` decodes with `overrides`."""
    _, result = generate.run(
        validated_config(["task.prompt=The patient", "task.max_new_tokens=12", *overrides], "generate")
    )
    return result.tokens


def test_generate_from_checkpoint_export_and_torch_sparse_agree_with_transformers(llama_run: Path) -> None:
    export = llama_run / "hf"
    from_checkpoint = generated(f"run_dir={llama_run}")
    assert 0 < len(from_checkpoint) <= 12  # greedy stops after EOS
    assert generated(f"task.hf_dir={export}") == from_checkpoint
    assert generated(f"run_dir={llama_run}", "task.converter=torch_sparse") == from_checkpoint
    assert generated(f"task.hf_dir={export}", "task.converter=torch_sparse") == from_checkpoint

    loaded = load_for_inference(export, "task.hf_dir", "cpu", "fp32", "none")
    ids = loaded.tokenizer("The patient", return_tensors="pt")["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    assert isinstance(hf, LlamaForCausalLM)
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert expected[0, ids.shape[1] :].tolist()[: len(from_checkpoint)] == from_checkpoint


def test_torch_sparse_converts_every_masked_llama_linear(llama_run: Path) -> None:
    """Every sparse projection of every block runs as a `SparseLinear`, with the logits of the masked-dense model."""
    dense = load_for_inference(llama_run, "run_dir", "cpu", "fp32", "none").model
    sparse = load_for_inference(llama_run, "run_dir", "cpu", "fp32", "torch_sparse", tokens=1).model
    converted = [name for name, module in sparse.named_modules() if isinstance(module, SparseLinear)]
    assert len(converted) == LINEARS_PER_BLOCK * dense.config.n_layer
    ids = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids)[0], dense(ids)[0], atol=1e-5, rtol=0)


@needs_shared
def test_evaluate_checkpoint_export_and_transformers_agree(llama_run: Path) -> None:
    cfg = to_object(load_config(["task=evaluate", f"run_dir={llama_run}", f"task.pubmedqa_data={PQA}"]))
    examples = load_pubmedqa(PQA, "test")[:8]
    from_checkpoint = evaluate_pubmedqa(
        load_model(str(llama_run), cfg, "task.checkpoints"), examples, "test", progress=False
    )
    exported = load_model(str(llama_run / "hf"), cfg, "task.hf_dirs")
    assert exported.kind == "hf (ours)"
    from_export = evaluate_pubmedqa(exported, examples, "test", progress=False)
    exported.logits_fn = hf_logits(AutoModelForCausalLM.from_pretrained(llama_run / "hf").eval())
    through_transformers = evaluate_pubmedqa(exported, examples, "test", batch_size=3, progress=False)
    for other in (from_export, through_transformers):
        for a, b in zip(from_checkpoint.questions, other.questions, strict=True):
            assert a["predicted"] == b["predicted"]
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    assert from_checkpoint.step == from_export.step == 2
    assert from_checkpoint.train_flops is not None and from_checkpoint.train_flops == pytest.approx(
        from_export.train_flops
    )

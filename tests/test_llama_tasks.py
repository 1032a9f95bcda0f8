"""The Llama family through the zoo's commands on a sparse `llama_tiny` run trained here: `generate` and `evaluate`
(checkpoint, HF export, `torch_sparse`), fine-tuning (PubMedQA, HoC -> `LlamaForSequenceClassification`) and soft
prompting (a PEFT adapter that loads on the HF Llama export)."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PretrainedConfig,
)

from modelzoo import checkpoint as ckpt
from modelzoo.backends.torch_sparse import SparseLinear
from modelzoo.cli import main
from modelzoo.config import load_config, to_object
from modelzoo.config.prune import PruneConfig
from modelzoo.downstream.evaluate import evaluate_pubmedqa, hf_logits, load_model
from modelzoo.downstream.pubmedqa import load_pubmedqa
from modelzoo.errors import ConfigError
from modelzoo.export.hf import SPARSITY_FILE, load_hf, to_hf_config
from modelzoo.export.peft import load_prompt_adapter, save_prompt_adapter
from modelzoo.export.seq_cls import export_seq_cls
from modelzoo.inference import load_for_inference
from modelzoo.models.classifier import Classifier
from modelzoo.models.llama import Llama
from modelzoo.models.soft_prompt import PromptedLM, SoftPrompt
from modelzoo.prune.sequential import prune_model
from modelzoo.sparsity.masks import MASK_SUFFIX
from modelzoo.tasks import finetune, generate
from modelzoo.tasks.finetune import FinetuneSummary
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.validate import validated_config
from tests.conftest import SHARED, make_config, needs_shared
from tests.test_downstream_data import PQA
from tests.test_evaluate import assert_same_answers
from tests.test_export import make_tokenizer
from tests.test_llama import SMALL, make_model

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
    assert_same_answers(from_checkpoint, from_export, through_transformers)
    assert from_checkpoint.step == from_export.step == 2
    assert from_checkpoint.train_flops is not None and from_checkpoint.train_flops == pytest.approx(
        from_export.train_flops
    )


# ---- fine-tuning and soft prompting ------------------------------------------------------------------------------
def test_sequence_classification_export_is_llama_with_equal_logits(tmp_path: Path) -> None:
    """An untied Llama's classifier exports as `LlamaForSequenceClassification` (its LM head left out)."""
    classifier = Classifier(make_model(), 10, pad_token_id=0).eval()
    export_seq_cls(classifier, tmp_path / "hf", [f"h{i}" for i in range(10)])
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf_model, LlamaForSequenceClassification) and hf_model.config.pad_token_id == 0
    ids = torch.randint(1, SMALL.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    ids[0, 12:], ids[1, 5:] = 0, 0  # right padding of different lengths
    with torch.no_grad():
        torch.testing.assert_close(classifier(ids), hf_model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_peft_loads_llama_seq_cls_adapter_with_equal_logits(tmp_path: Path) -> None:
    backbone = make_model()
    prompt = SoftPrompt(5, SMALL.n_embd)
    prompt.init_from_vocab(backbone.embedding.weight, torch.Generator().manual_seed(0))
    classifier = Classifier(backbone, 10, pad_token_id=0, prompt=prompt).eval()
    base = export_seq_cls(classifier, tmp_path / "hf", [f"label {i}" for i in range(10)])
    adapter = save_prompt_adapter(prompt, tmp_path / "a", SMALL, "seq_cls", base, score_weight=classifier.score.weight)
    peft_model = PeftModel.from_pretrained(LlamaForSequenceClassification.from_pretrained(base), adapter).eval()
    ids = torch.randint(1, SMALL.vocab_size, (3, 17), generator=torch.Generator().manual_seed(5))  # PEFT pools -1
    with torch.no_grad():
        torch.testing.assert_close(classifier(ids), peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


FAST = ("task.limit=12", "task.max_steps=2", "task.eval_every=2", "task.batch_size=4", "task.micro_batch_size=4")


def adapt(task: str, llama_run: Path, out: Path, dataset: str, *overrides: str) -> FinetuneSummary:
    cfg = validated_config(
        [f"task.pretrained={llama_run}", f"task.output_dir={out}", f"task.dataset={dataset}",
         f"task.data_dir={SHARED / 'data' / dataset}", "task.seq_len=48", *FAST, *overrides],
        task,
    )  # fmt: skip
    return finetune.run(cfg)


@needs_shared
def test_finetune_llama_pubmedqa_keeps_masks_and_hoc_exports_llama_classifier(llama_run: Path, tmp_path: Path) -> None:
    summary = adapt("finetune", llama_run, tmp_path / "qa", "pubmedqa", "task.sparsity=keep")
    assert summary.nonzero_fraction == 0.0 and set(summary.test) == {"accuracy", "macro_f1"}
    lm = AutoModelForCausalLM.from_pretrained(summary.exports["hf"])
    assert isinstance(lm, LlamaForCausalLM)
    assert json.loads((Path(summary.exports["hf"]) / SPARSITY_FILE).read_text())["global_sparsity"] >= 0.5

    summary = adapt("finetune", llama_run, tmp_path / "hoc", "hoc", "task.sparsity=dense")
    assert isinstance(
        AutoModelForSequenceClassification.from_pretrained(summary.exports["hf"]), LlamaForSequenceClassification
    )
    assert set(summary.test) == {"f1", "macro_f1", "threshold"}


@needs_shared
def test_prompt_tune_llama_adapter_loads_with_peft_on_the_export(llama_run: Path, tmp_path: Path) -> None:
    summary = adapt("prompt_tune", llama_run, tmp_path / "pt", "pubmedqa", "task.num_virtual_tokens=8")
    assert summary.trainable_params == 8 * 64
    base, adapter = Path(summary.exports["hf"]), Path(summary.exports["adapter"])
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).eval()
    ours = PromptedLM(load_hf(base), load_prompt_adapter(adapter)[0]).eval()
    ids = torch.randint(0, 1024, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[:, 8:]
        torch.testing.assert_close(ours(ids)[0], theirs, atol=1e-5, rtol=1e-4)


# ---- task.init_from: shape and tokenizer from the directory -------------------------------------------------------
@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face Llama directory built from a config (GQA, Llama-3 RoPE scaling, tied, a non-default RMSNorm eps
    and rope_theta) with a word-level tokenizer of its vocabulary: what a user downloads, in miniature. Its sizes are
    conftest's SMALL, which `make_config` gives explicitly."""
    directory = tmp_path_factory.mktemp("hf_llama") / "llama-mini"
    config = replace(
        SMALL, n_head=2, n_kv_head=1, n_inner=256, vocab_size=1024, tie_word_embeddings=True, rms_norm_eps=1e-6
    )
    torch.manual_seed(0)
    LlamaForCausalLM(to_hf_config(config, 0, 0)).save_pretrained(directory)
    make_tokenizer(1024).save_pretrained(directory)
    return directory


ROUND_TRIP = ("num_key_value_heads", "tie_word_embeddings", "rms_norm_eps")


def rope(config: PretrainedConfig) -> dict:
    """RoPE theta and scaling as one dict: transformers 5.x's `rope_parameters`, 4.x's two keys."""
    return getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta, **config.rope_scaling}


def test_init_from_takes_shape_and_tokenizer_from_the_directory(
    hf_llama: Path, tmp_path: Path, cache_dir: Path
) -> None:
    run = tmp_path / "run"
    cfg = make_config(run, cache_dir, f"task.init_from={hf_llama}", "task.max_steps=1", "sparsity=dense")
    assert cfg.model.family == "llama" and cfg.model.n_layer == 2 and cfg.tokenizer.path == str(hf_llama)
    trainer = Pretraining(cfg)
    assert trainer.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(hf_llama).get_vocab()  # no new BPE
    trainer.fit()
    source, exported = (AutoConfig.from_pretrained(d) for d in (hf_llama, run / "hf"))
    for key in ROUND_TRIP:
        assert getattr(exported, key) == getattr(source, key), key
    assert rope(exported) == rope(source) and rope(source)["rope_type"] == "llama3" and rope(source)["factor"] == 8.0
    assert source.num_key_value_heads == 1 and source.tie_word_embeddings and source.rms_norm_eps == 1e-6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.n_kv_head=2",), "model.n_kv_head: 2 but task.init_from="),
        (("model=llama_tiny",), "model.n_kv_head: 2 but task.init_from="),
        (("model=tiny",), "model.family: gpt but task.init_from="),
        (("tokenizer=bpe",), "tokenizer.path: null (a BPE trained on the corpus) but task.init_from="),
    ],
)
def test_init_from_refuses_an_explicit_model_or_tokenizer_that_differs(
    hf_llama: Path, tmp_path: Path, cache_dir: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(tmp_path, cache_dir, f"task.init_from={hf_llama}", *overrides)


def test_init_from_refuses_another_tokenizer_directory(hf_llama: Path, tmp_path: Path, cache_dir: Path) -> None:
    make_tokenizer(200).save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"tokenizer\.path: .*other has another vocabulary"):
        make_config(tmp_path, cache_dir, f"task.init_from={hf_llama}", f"tokenizer.path={tmp_path / 'other'}")
    agreeing = (f"tokenizer.path={hf_llama}", "model.n_kv_head=1")  # explicit values that agree are kept
    assert make_config(tmp_path, cache_dir, f"task.init_from={hf_llama}", *agreeing).model.n_kv_head == 1


# ---- one-shot pruning and sparse continued pre-training (the Sparse Llama recipe minus distillation) ---------------
@pytest.mark.parametrize("target", ["50%", "2:4"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_prune_our_llama_hits_the_target_in_every_projection(method: str, target: str) -> None:
    model = make_model()
    config = PruneConfig(method=method, **({"sparsity": 0.5} if target == "50%" else {"n_m": [2, 4]}))
    ids = torch.randint(0, SMALL.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, ids, config)
    assert len(result.masks) == LINEARS_PER_BLOCK * SMALL.n_layer
    for name, mask in result.masks.items():
        weight = model.get_parameter(name)
        assert torch.equal(weight != 0, mask), name
        if target == "2:4":
            assert bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2).all()), name
        else:
            assert int((weight == 0).sum()) == weight.numel() // 2, name


@pytest.fixture(scope="module")
def dense_llama_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("dense_llama") / "run"
    Pretraining(make_config(run, cache_dir, *LLAMA, "sparsity=dense", "task.max_steps=1", "task.export=false")).fit()
    return run


def test_prune_our_llama_checkpoint_with_the_command(dense_llama_run: Path, cache_dir: Path, capsys) -> None:
    main(["prune", f"run_dir={dense_llama_run}", f"data.cache_dir={cache_dir}", "model.n_positions=64",
          "task.n_m=[2,4]", "task.calibration_samples=4"])  # fmt: skip
    out = dense_llama_run / "pruned" / "sparsegpt-2of4"
    assert f"task.init_from={out}" in capsys.readouterr().out
    report = json.loads((out / SPARSITY_FILE).read_text())
    assert len(report["per_tensor"]) == LINEARS_PER_BLOCK * 2 and set(report["per_tensor"].values()) == {0.5}
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), LlamaForCausalLM)


def test_prune_hf_llama_then_continue_sparse_pretraining_from_it(
    hf_llama: Path, tmp_path: Path, cache_dir: Path, capsys
) -> None:
    """The README's Sparse Llama recipe: `modelzoo prune task.hf_dir=DIR`, then `pretrain task.init_from=<pruned>
    sparsity.init_method=from_weights task.distill.teacher=DIR`: the masks are the pruned zeros (their level read
    from the weights) and stay zero through training with distillation from the dense directory."""
    out = tmp_path / "pruned"
    main(["prune", f"task.hf_dir={hf_llama}", f"task.output_dir={out}", f"data.cache_dir={cache_dir}",
          "data.seq_len=64", "task.method=wanda", "task.sparsity=0.5", "task.calibration_samples=4"])  # fmt: skip
    pruned = load_file(out / "model.safetensors")
    run = tmp_path / "continued"
    main(["pretrain", f"task.init_from={out}", "sparsity.init_method=from_weights", f"task.distill.teacher={hf_llama}",
          f"run_dir={run}", f"data.cache_dir={cache_dir}", "backend=masked_dense", "task.max_steps=2",
          "task.batch_size=4", "task.micro_batch_size=4", "task.eval_every=2", "task.checkpoint_every=2"])  # fmt: skip
    state = load_file(ckpt.latest_checkpoint(run) / ckpt.MODEL_FILE)
    masks = {k.removesuffix(MASK_SUFFIX): v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    assert len(masks) == LINEARS_PER_BLOCK * 2
    for name, mask in masks.items():
        assert torch.equal(mask, pruned[name] != 0), name
        assert not state[name][~mask].any() and not torch.equal(state[name], pruned[name]), name  # trained, zeros kept
    assert (
        AutoTokenizer.from_pretrained(run / "tokenizer").get_vocab()
        == AutoTokenizer.from_pretrained(hf_llama).get_vocab()
    )
    with (run / "metrics.csv").open() as f:
        assert all(float(row["kd_loss"]) > 0 and float(row["hidden_loss"]) > 0 for row in csv.DictReader(f))

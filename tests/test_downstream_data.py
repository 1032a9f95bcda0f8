"""PubMedQA and HoC loaders on the real files, the lm-eval prompt, the BLURB HoC metric and choice scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modelzoo.downstream.hoc import HALLMARKS, HoCExample, evaluate_hoc, hallmark_macro_f1, hoc_f1, load_hoc
from modelzoo.downstream.pubmedqa import CHOICES, load_pubmedqa, majority_baseline, pubmedqa_prompt
from modelzoo.downstream.scoring import choice_loglikelihoods
from modelzoo.errors import ConfigError, DataError
from modelzoo.models.gpt import GPT, GPTConfig
from tests.conftest import SHARED, needs_shared

PQA = SHARED / "data" / "pubmedqa"
HOC = SHARED / "data" / "hoc"


def counts(examples: list) -> tuple[int, ...]:
    return tuple(sum(e.label == c for e in examples) for c in CHOICES)


@needs_shared
@pytest.mark.parametrize(
    ("split", "n", "labels"),
    [("test", 500, (276, 169, 55)), ("train", 450, (249, 152, 49)), ("dev", 50, (27, 17, 6)), ("all", 1000, None)],
)
def test_pubmedqa_published_counts(split: str, n: int, labels: tuple[int, ...] | None) -> None:
    examples = load_pubmedqa(PQA, split)
    assert len(examples) == n == len({e.pubid for e in examples})
    if labels:
        assert counts(examples) == labels


@needs_shared
def test_pubmedqa_sources_agree() -> None:
    """Directory, original JSON (+ split file) and the regenerated test_set.json give the same questions."""
    test = load_pubmedqa(PQA, "test")
    assert sorted(load_pubmedqa(PQA / "ori_pqal.json", "test"), key=lambda e: e.pubid) == sorted(
        test, key=lambda e: e.pubid
    )
    assert load_pubmedqa(PQA / "test_set.json", "all") == test
    assert load_pubmedqa(PQA / "pqal_test.jsonl", "all") == test
    assert len(load_pubmedqa(PQA / "ori_pqal.json", "all")) == 1000
    assert majority_baseline(test) == ("yes", 0.552)


@needs_shared
def test_pubmedqa_ground_truth_beside_json(tmp_path: Path) -> None:
    """Records without `final_decision` take it from test_ground_truth.json, as in the upstream repo layout."""
    records = json.loads((PQA / "test_set.json").read_text())
    stripped = {pubid: {k: v for k, v in r.items() if k != "final_decision"} for pubid, r in records.items()}
    (tmp_path / "test_set.json").write_text(json.dumps(stripped, indent=4))
    (tmp_path / "test_ground_truth.json").write_bytes((PQA / "test_ground_truth.json").read_bytes())
    assert load_pubmedqa(tmp_path / "test_set.json", "all") == load_pubmedqa(PQA, "test")


@needs_shared
def test_pubmedqa_hub_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """bigbio's fold-0 config: "all" is its three splits together; qiaojin/PubMedQA: its one split of 1,000."""
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (PQA / "pqal_fold0_dev.jsonl").open()][:2]
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: asked.append((config, split)) or rows)
    assert len(load_pubmedqa("bigbio/pubmed_qa", "all")) == 2
    load_pubmedqa("bigbio/pubmed_qa", "dev")
    load_pubmedqa("qiaojin/PubMedQA", "all")
    assert asked == [
        ("pubmed_qa_labeled_fold0_source", "train+validation+test"),
        ("pubmed_qa_labeled_fold0_source", "validation"),
        ("pqa_labeled", "train"),
    ]


def lm_eval_doc_to_text(doc: dict) -> str:
    """lm-evaluation-harness `lm_eval/tasks/pubmedqa/preprocess_pubmedqa.py` @ 4e7e0d4 (see shared/data/README)."""
    ctxs = "\n".join(doc["CONTEXTS"])
    return "Abstract: {}\nQuestion: {}\nAnswer:".format(
        ctxs,
        doc["QUESTION"],
    )


@needs_shared
def test_prompt_equals_lm_eval_template_byte_for_byte() -> None:
    docs = {str(json.loads(line)["pubid"]): json.loads(line) for line in (PQA / "pqal_all.jsonl").open()}
    for example in load_pubmedqa(PQA, "all"):
        prompt = pubmedqa_prompt(example)
        assert prompt.encode() == lm_eval_doc_to_text(docs[example.pubid]).encode()
        assert "LONG_ANSWER" not in prompt and docs[example.pubid]["LONG_ANSWER"] not in prompt
    example = load_pubmedqa(PQA, "dev")[0]
    assert pubmedqa_prompt(example, with_long_answer=True) == (
        "Abstract: " + "\n".join([*example.contexts, example.long_answer]) + f"\nQuestion: {example.question}\nAnswer:"
    )


@needs_shared
@pytest.mark.parametrize(("split", "n", "unlabelled"), [("train", 1295, 197), ("dev", 186, 22), ("test", 371, 53)])
def test_hoc_blurb_split_counts(split: str, n: int, unlabelled: int) -> None:
    docs = load_hoc(HOC, split)
    assert len(docs) == n == len({d.doc_id for d in docs})
    assert sum(not d.labels for d in docs) == unlabelled
    assert load_hoc(HOC / "blurb" / f"{split}.tsv", split) == docs  # BLURB's sentence TSV, grouped per abstract


@needs_shared
def test_hoc_train_label_counts() -> None:
    docs = load_hoc(HOC, "train")
    per_label = {h: sum(i in d.labels for d in docs) for i, h in enumerate(HALLMARKS)}
    assert per_label["sustaining proliferative signaling"] == 315
    assert per_label["cellular energetics"] == 68
    assert docs[0].label_vector().sum() == len(docs[0].labels)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@needs_shared
def test_pubmedqa_bad_records_name_file_and_line(tmp_path: Path) -> None:
    good = [json.loads(line) for line in (PQA / "pqal_fold0_dev.jsonl").open()][:3]
    missing = write_jsonl(tmp_path / "missing.jsonl", [good[0], {k: v for k, v in good[1].items() if k != "QUESTION"}])
    with pytest.raises(DataError, match=r"missing\.jsonl:2: record has no 'QUESTION' field"):
        load_pubmedqa(missing, "all")
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [*good[:2], {**good[2], "final_decision": "perhaps"}])
    with pytest.raises(DataError, match=r"unknown\.jsonl:3: unknown label 'perhaps'"):
        load_pubmedqa(unknown, "all")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl: split 'all' has no records"):
        load_pubmedqa(empty, "all")
    with pytest.raises(DataError, match=r"pqal_test\.jsonl: split 'train' has no records"):
        load_pubmedqa(PQA / "pqal_test.jsonl", "train")  # no test question is in fold-0 train
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        load_pubmedqa(broken, "all")
    with pytest.raises(ConfigError, match=r"split: unknown split 'validation'"):
        load_pubmedqa(PQA, "validation")
    with pytest.raises(ConfigError, match=r"pqal_splits\.json"):
        load_pubmedqa(write_jsonl(tmp_path / "valid.jsonl", good), "test")


@needs_shared
def test_pubmedqa_original_json_error_line(tmp_path: Path) -> None:
    """In a pretty-printed `ori_pqal.json`, the line named is the one where the bad record's PMID key starts."""
    records = json.loads((PQA / "ori_pqal.json").read_text())
    pubids = list(records)[:3]
    subset = {p: records[p] for p in pubids}
    subset[pubids[2]] = {**subset[pubids[2]], "final_decision": "Yes"}
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps(subset, indent=4))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith(f'    "{pubids[2]}"'))
    with pytest.raises(DataError, match=rf"ori_pqal\.json:{line}: unknown label 'Yes'"):
        load_pubmedqa(path, "all")


@needs_shared
def test_hoc_bad_records_name_file_and_line(tmp_path: Path) -> None:
    good = [json.loads(line) for line in (HOC / "hoc_dev.jsonl").open()][:2]
    unknown = write_jsonl(tmp_path / "hoc.jsonl", [good[0], {**good[1], "labels": ["cellular energy"]}])
    with pytest.raises(DataError, match=r"hoc\.jsonl:2: unknown label 'cellular energy'"):
        load_hoc(unknown, "dev")
    missing = write_jsonl(tmp_path / "nolabels.jsonl", [{k: v for k, v in good[0].items() if k != "labels"}])
    with pytest.raises(DataError, match=r"nolabels\.jsonl:1: record has no 'labels' field"):
        load_hoc(missing, "dev")
    with pytest.raises(DataError, match=r"none\.jsonl: split 'test' has no records"):
        load_hoc(write_jsonl(tmp_path / "none.jsonl", []), "test")
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("labels\tsentence\tindex\n0_0,1_1\tA sentence .\t1_s0\n0_0,1_2\tAnother .\t1_s1\n")
    with pytest.raises(DataError, match=r"dev\.tsv:3: bad label flag '1_2'"):
        load_hoc(tsv, "dev")


def test_hoc_f1_is_pooled_over_documents_and_hallmarks() -> None:
    gold = [{0, 1}, {1}, {2}, set()]
    predicted = [{0}, {0}, {2}, {1}]
    assert hoc_f1(gold, predicted) == pytest.approx(0.5)  # pooled: TP 2, FP 2, FN 2 (LinkBERT's compute_p_r_f)
    # hallmark 0: TP 1, FP 1 -> 2/3; hallmark 1: TP 0 -> 0; hallmark 2: TP 1 -> 1; the other 7 never occur -> 0.
    assert hallmark_macro_f1(gold, predicted) == pytest.approx((2 / 3 + 0 + 1) / 10)
    everything = [set(range(10))] * 4
    assert hoc_f1(everything, everything) == 1.0
    with pytest.raises(ValueError, match="0/1"):
        hoc_f1(gold, torch.full((4, 10), 0.7))  # probabilities, not decisions


def test_evaluate_hoc_picks_threshold_on_dev() -> None:
    gold = [HoCExample(str(i), "", frozenset({i % 10})) for i in range(20)]
    probs = torch.full((20, 10), 0.3)
    for i in range(20):
        probs[i, i % 10] = 0.6  # right labels score 0.6, wrong ones 0.3: any threshold in (0.3, 0.6] is perfect
    result = evaluate_hoc(probs, gold, probs, gold)
    assert result.threshold == 0.35 and result.dev_f1 == result.test_f1 == 1.0
    assert evaluate_hoc(probs, gold, probs, gold, thresholds=[0.1]).test_f1 == pytest.approx(2 / 11)


# ---- scoring ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained in memory on PubMedQA-like text, so choices split like real ones."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(
        ["Abstract: the patients were treated. Question: is it safe? Answer: yes no"] * 20, trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@torch.no_grad()
def reference_loglikelihood(
    model: GPT, tokenizer: PreTrainedTokenizerFast, context: str, continuation: str, window: int
) -> float:
    """One request at a time, unbatched: sum log p(continuation) after the left-truncated context."""
    whole = tokenizer(context + continuation)["input_ids"]
    continuation_ids = whole[len(tokenizer(context)["input_ids"]) :]
    tokens = torch.tensor(whole[-(window + 1) :])
    logits, _ = model(tokens[None, :-1])
    log_probs = logits[0, -len(continuation_ids) :].log_softmax(-1)
    return float(log_probs.gather(1, torch.tensor(continuation_ids)[:, None]).sum())


def test_choice_loglikelihoods_match_one_request_at_a_time(bpe: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=24, vocab_size=400)).eval()
    contexts = [
        "Abstract: the patients were treated.\nQuestion: is it safe?\nAnswer:",
        "Abstract: short.\nQuestion: no?\nAnswer:",
        "Abstract: " + "the patients were treated. " * 6 + "\nQuestion: is it? \nAnswer: ",  # truncated; a space
    ]
    choices = ["yes", "no", "maybe", "unsafe answer"]  # multi-token choices exercise the continuation slicing

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert ids.shape[1] <= 24 and mask[:, 0].all()
        return model(ids)[0]

    scores = choice_loglikelihoods(logits_fn, bpe, contexts, choices, batch_size=3, progress=False, max_length=24)
    assert scores.shape == (3, 4) and scores.dtype == torch.float64
    for i, context in enumerate(contexts):
        stripped = context.rstrip()  # lm-eval moves a context's trailing spaces into the continuation
        for j, choice in enumerate(choices):
            expected = reference_loglikelihood(model, bpe, stripped, context[len(stripped) :] + " " + choice, 24)
            assert float(scores[i, j]) == pytest.approx(expected, abs=1e-4)

"""PubMedQA PQA-L (Jin et al., EMNLP 2019): loading, and the prompt of lm-evaluation-harness's `pubmedqa` task.

Sources `load_pubmedqa` reads:
- the shared data directory (`../shared/data/pubmedqa`): split "train" / "dev" are fold 0 (450 / 50), "test" the
  official 500 questions, "all" the 1,000;
- one file: the original JSON (`ori_pqal.json`, `test_set.json`: a dict PMID -> record, labels taken from a
  `test_ground_truth.json` beside it when records lack `final_decision`) or JSON Lines (one record per line with
  `pubid`). "all" keeps every record; another split keeps the PMIDs `pqal_splits.json` (beside the file) lists;
- a Hugging Face dataset name, optionally `name:config`: `bigbio/pubmed_qa` (default config
  `pubmed_qa_labeled_fold0_source`, splits train / validation / test, "all" the three) or `qiaojin/PubMedQA` /
  `pubmed_qa` (default config `pqa_labeled`, one split of 1,000: use split "all").

Records use the field names of `ori_pqal.json` (= bigbio's source schema); the hub's `pqa_labeled` schema is mapped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelzoo.downstream.records import field, read_json_object, read_jsonl, split_name
from modelzoo.errors import ConfigError, DataError

CHOICES = ("yes", "no", "maybe")
SPLITS = ("train", "dev", "test", "all")
DIR_FILES = {
    "train": "pqal_fold0_train.jsonl",
    "dev": "pqal_fold0_dev.jsonl",
    "test": "pqal_test.jsonl",
    "all": "pqal_all.jsonl",
}
HUB_DEFAULT_CONFIGS = {
    "bigbio/pubmed_qa": "pubmed_qa_labeled_fold0_source",
    "qiaojin/PubMedQA": "pqa_labeled",
    "pubmed_qa": "pqa_labeled",
}
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test", "all": "train+validation+test"}


@dataclass(frozen=True)
class PubMedQAExample:
    """One expert-labelled question: the abstract without its conclusion (`contexts`), the conclusion, the label."""

    pubid: str
    question: str
    contexts: tuple[str, ...]
    long_answer: str
    label: str

    @property
    def label_index(self) -> int:
        """Index of `label` in `CHOICES`."""
        return CHOICES.index(self.label)


def pubmedqa_prompt(example: PubMedQAExample, with_long_answer: bool = False) -> str:
    r"""The lm-evaluation-harness `pubmedqa` prompt: `Abstract: <contexts joined by \n>\nQuestion: <q>\nAnswer:`.

    This is byte for byte lm-eval's `preprocess_pubmedqa.doc_to_text` (reasoning-required setting, the default).
    `with_long_answer=True` gives the reasoning-free setting of the PubMedQA paper: the conclusion is appended to
    the abstract as one more section, so the model sees the answer's evidence.
    """
    contexts = (*example.contexts, example.long_answer) if with_long_answer else example.contexts
    return "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(contexts), example.question)


def majority_baseline(examples: list[PubMedQAExample]) -> tuple[str, float]:
    """The most frequent label and the accuracy of always answering it (first in `CHOICES` order on ties)."""
    counts = [sum(e.label == c for e in examples) for c in CHOICES]
    best = max(range(len(CHOICES)), key=lambda i: (counts[i], -i))
    return CHOICES[best], counts[best] / len(examples)


def load_pubmedqa(source: str | Path, split: str) -> list[PubMedQAExample]:
    """The examples of `split` ("train", "dev", "test": fold 0 / official test; or "all") from `source`.

    Raises:
        ConfigError: an unknown split, or a split a source cannot give.
        DataError: a missing file, a record missing a field, an unknown label or an empty split, named by file
            and line.
    """
    split_name(split, SPLITS)
    path = Path(source)
    if path.is_dir():
        examples = _load_file(path / DIR_FILES[split], "all")
    elif path.is_file():
        examples = _load_file(path, split)
    elif path.suffix in (".json", ".jsonl") or path.is_absolute() or str(source).startswith("."):
        raise DataError(path, "no such file or directory; give the PubMedQA data directory or a JSON/JSONL file")
    else:
        return _load_hub(str(source), split)
    if not examples:
        raise DataError(path, f"split {split!r} has no records; check the file and the split name")
    return examples


def _example(record: dict[str, Any], pubid: str, path: Path, line: int) -> PubMedQAExample:
    label = field(record, "final_decision", str, path, line)
    if label not in CHOICES:
        raise DataError(path, f"unknown label {label!r} in 'final_decision'; labels are {', '.join(CHOICES)}", line)
    contexts = field(record, "CONTEXTS", list, path, line)
    if not all(isinstance(c, str) for c in contexts):
        raise DataError(path, "field 'CONTEXTS' must be a list of strings", line)
    return PubMedQAExample(
        pubid=pubid,
        question=field(record, "QUESTION", str, path, line),
        contexts=tuple(contexts),
        long_answer=field(record, "LONG_ANSWER", str, path, line),
        label=label,
    )


def _load_file(path: Path, split: str) -> list[PubMedQAExample]:
    if not path.is_file():
        raise DataError(path, "no such file; the PubMedQA directory needs the files of ../shared/data/pubmedqa")
    if path.suffix == ".jsonl":
        examples = [
            _example(record, str(field(record, "pubid", (str, int), path, line)), path, line)
            for line, record in read_jsonl(path)
        ]
    else:
        truth = _ground_truth(path)
        examples = []
        for line, pubid, record in read_json_object(path):
            if not isinstance(record, dict):
                raise DataError(path, f"entry {pubid!r} is a {type(record).__name__}, expected an object", line)
            if "final_decision" not in record and pubid in truth:
                record = {**record, "final_decision": truth[pubid]}
            examples.append(_example(record, pubid, path, line))
    if split == "all":
        return examples
    keep = _split_pubids(path, split)
    return [e for e in examples if e.pubid in keep]


def _ground_truth(path: Path) -> dict[str, str]:
    """Labels of `test_ground_truth.json` beside `path` (a dict PMID -> label), or none."""
    truth = path.with_name("test_ground_truth.json")
    return {} if path == truth or not truth.is_file() else json.loads(truth.read_text(encoding="utf-8"))


def _split_pubids(path: Path, split: str) -> set[str]:
    """PMIDs of `split` (fold 0 for train / dev) from the `pqal_splits.json` beside `path`."""
    splits_file = path.with_name("pqal_splits.json")
    if not splits_file.is_file():
        raise ConfigError(
            "split", f"{split!r} needs {splits_file} to select its questions from {path}; use split 'all'", ["all"]
        )
    splits = json.loads(splits_file.read_text(encoding="utf-8"))
    return set(splits["test"] if split == "test" else splits["folds"][0][split])


def _load_hub(source: str, split: str) -> list[PubMedQAExample]:
    """Load a Hugging Face hub dataset by name (`name` or `name:config`), mapping its schema to ours."""
    import datasets

    name, _, config = source.partition(":")
    config = config or HUB_DEFAULT_CONFIGS.get(name)
    if config == "pqa_labeled" and split != "all":
        raise ConfigError("split", f"{name} ({config}) has no train/dev/test split; use 'all' or bigbio/pubmed_qa")
    hub_split = "train" if config == "pqa_labeled" else HUB_SPLITS[split]  # pqa_labeled: its one split of 1,000
    try:
        dataset = datasets.load_dataset(name, config, split=hub_split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise ConfigError(
            "source", f"cannot load {source!r} from the hub ({exc}); offline, give ../shared/data/pubmedqa"
        ) from exc
    where = Path(f"{name}[{hub_split}]")
    examples = []
    for i, row in enumerate(dataset, start=1):
        if "context" in row:  # qiaojin/PubMedQA pqa_labeled schema
            row = {
                "QUESTION": row["question"],
                "CONTEXTS": row["context"]["contexts"],
                "LONG_ANSWER": row["long_answer"],
                "final_decision": row["final_decision"],
                "pubid": row["pubid"],
            }
        examples.append(_example(row, str(row.get("pubid", i)), where, i))
    if not examples:
        raise DataError(where, f"split {split!r} has no records")
    return examples

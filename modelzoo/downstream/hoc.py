"""Hallmarks of Cancer (Baker et al., 2016), document level with the BLURB split, and the BLURB HoC metric.

`load_hoc` reads the shared data directory (`../shared/data/hoc`: `hoc_<split>.jsonl`, 1,295 / 186 / 371
abstracts), one such JSON Lines file, BLURB's sentence-level TSV (`blurb/<split>.tsv`, sentences grouped into
their abstract, labels united), or the hub dataset `bigbio/hallmarks_of_cancer` (`hallmarks_of_cancer_source`).

The metric (`hoc_f1`): F1 pooled over every (document, hallmark) pair of the split, i.e.
2 TP / (2 TP + FP + FN) on the documents x 10 hallmarks 0/1 matrix (sklearn's `average="micro"`). Why: BLURB
(Gu et al., 2021, the PubMedBERT paper) scores HoC at the abstract level by "average micro F1", and the
evaluation code behind the BLURB leaderboard numbers (LinkBERT's `src/seqcls/utils_hoc.py`, `compute_p_r_f`,
also used by SciFive to compare with the leaderboard) groups sentence labels into abstracts and computes
precision, recall and F1 from TP, predicted and gold counts summed over the whole matrix: the pooled F1.
`hallmark_macro_f1`, the unweighted mean of the 10 per-hallmark F1s, is reported beside it.
"""

from __future__ import annotations

import csv
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modelzoo.downstream.records import field, read_jsonl, split_name
from modelzoo.errors import ConfigError, DataError

HALLMARKS: tuple[str, ...] = (
    "activating invasion and metastasis",
    "avoiding immune destruction",
    "cellular energetics",
    "enabling replicative immortality",
    "evading growth suppressors",
    "genomic instability and mutation",
    "inducing angiogenesis",
    "resisting cell death",
    "sustaining proliferative signaling",
    "tumor promoting inflammation",
)
NONE_LABELS = ("none", "empty", "null")  # how sources spell "no hallmark"
SPLITS = ("train", "dev", "test")
Labels = Sequence[Collection[int]] | torch.Tensor  # per document its hallmark indices, or a (documents, 10) 0/1 matrix
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


@dataclass(frozen=True)
class HoCExample:
    """One abstract: its PMID, its text (tokenised sentences joined by spaces) and its hallmarks (indices)."""

    doc_id: str
    text: str
    labels: frozenset[int]

    def label_vector(self) -> torch.Tensor:
        """The labels as a (10,) float 0/1 vector, the target of a BCE loss."""
        vector = torch.zeros(len(HALLMARKS))
        vector[list(self.labels)] = 1.0
        return vector


def load_hoc(source: str | Path, split: str) -> list[HoCExample]:
    """The abstracts of `split` ("train", "dev", "test": the BLURB split) from `source`.

    Raises:
        ConfigError: an unknown split.
        DataError: a missing file, a record missing a field, an unknown label or an empty split, named by file
            and line.
    """
    split_name(split, SPLITS)
    path = Path(source)
    if path.is_dir():
        path = path / f"hoc_{split}.jsonl"
    elif not path.exists() and not (path.suffix or path.is_absolute() or str(source).startswith(".")):
        return _load_hub(str(source), split)
    if not path.is_file():
        raise DataError(path, "no such file; give the HoC data directory (../shared/data/hoc) or a JSONL/TSV file")
    examples = _load_tsv(path) if path.suffix == ".tsv" else _load_jsonl(path)
    if not examples:
        raise DataError(path, f"split {split!r} has no records; check the file and the split name")
    return examples


def _label_index(name: str, path: Path | str, line: int) -> int | None:
    """Index of hallmark `name` (any case), None for "none"."""
    key = name.strip().lower()
    if key in NONE_LABELS:
        return None
    if key not in HALLMARKS:
        raise DataError(path, f"unknown label {name!r}; labels are the 10 hallmarks of HALLMARKS or 'none'", line)
    return HALLMARKS.index(key)


def _labels(names: Collection[str], path: Path | str, line: int) -> frozenset[int]:
    return frozenset(i for name in names if (i := _label_index(name, path, line)) is not None)


def _load_jsonl(path: Path) -> list[HoCExample]:
    examples = []
    for line, record in read_jsonl(path):
        names = field(record, "labels", list, path, line)
        if not all(isinstance(n, str) for n in names):
            raise DataError(path, "field 'labels' must be a list of hallmark names", line)
        examples.append(
            HoCExample(
                doc_id=str(field(record, "pmid", (str, int), path, line)),
                text=field(record, "text", str, path, line),
                labels=_labels(names, path, line),
            )
        )
    return examples


def _load_tsv(path: Path) -> list[HoCExample]:
    """BLURB's sentence-level TSV (`labels`, `sentence`, `index` = `<PMID>_s<i>`) grouped into abstracts."""
    sentences: dict[str, list[str]] = {}
    labels: dict[str, set[int]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"labels", "sentence", "index"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(path, f"header lacks {', '.join(sorted(missing))}; BLURB's is labels, sentence, index", 1)
        for line, row in enumerate(reader, start=2):
            if None in row.values():
                raise DataError(path, "row has fewer than 3 tab-separated fields", line)
            doc_id = row["index"].split("_")[0]
            sentences.setdefault(doc_id, []).append(row["sentence"])
            doc_labels = labels.setdefault(doc_id, set())
            for flag in row["labels"].split(","):
                index, _, value = flag.partition("_")
                if not (index.isdigit() and int(index) < len(HALLMARKS) and value in ("0", "1")):
                    raise DataError(path, f"bad label flag {flag!r}; BLURB writes <hallmark 0-9>_<0|1>", line)
                if value == "1":
                    doc_labels.add(int(index))
    return [HoCExample(d, " ".join(s), frozenset(labels[d])) for d, s in sentences.items()]


def _load_hub(source: str, split: str) -> list[HoCExample]:
    """bigbio's `hallmarks_of_cancer` (`name` or `name:config`): document_id, text, label (class indices)."""
    import datasets

    name, _, config = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or "hallmarks_of_cancer_source", split=HUB_SPLITS[split])
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise ConfigError(
            "source", f"cannot load {source!r} from the hub ({exc}); offline, give ../shared/data/hoc"
        ) from exc
    names = dataset.features["label"].feature.names
    where = f"{name}[{HUB_SPLITS[split]}]"
    examples = [
        HoCExample(str(row["document_id"]), row["text"], _labels([names[i] for i in row["label"]], where, line))
        for line, row in enumerate(dataset, start=1)
    ]
    if not examples:
        raise DataError(where, f"split {split!r} has no records")
    return examples


# ---- metric ---------------------------------------------------------------------------------------------------


def label_matrix(label_sets: Sequence[Collection[int]]) -> torch.Tensor:
    """(documents, 10) bool matrix of label index sets."""
    matrix = torch.zeros(len(label_sets), len(HALLMARKS), dtype=torch.bool)
    for row, labels in enumerate(label_sets):
        matrix[row, list(labels)] = True
    return matrix


def _as_matrix(labels: Labels) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        return label_matrix(labels)
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError("label tensors must hold 0/1; threshold probabilities first, or call evaluate_hoc")
    return labels.bool()


def _as_pair(gold: Labels, predicted: Labels) -> tuple[torch.Tensor, torch.Tensor]:
    y, p = _as_matrix(gold), _as_matrix(predicted)
    if y.shape != p.shape:
        raise ValueError(f"gold {tuple(y.shape)} and predictions {tuple(p.shape)} differ in shape")
    return y, p


def per_hallmark_f1(gold: Labels, predicted: Labels) -> torch.Tensor:
    """(10,) F1 of each hallmark's positive class over the documents; 0 where it has no gold and no prediction."""
    y, p = _as_pair(gold, predicted)
    tp = (y & p).sum(0).double()
    wrong = (y ^ p).sum(0).double()  # false positives + false negatives
    return torch.where(tp > 0, 2 * tp / (2 * tp + wrong), torch.zeros_like(tp))


def hoc_f1(gold: Labels, predicted: Labels) -> float:
    """The BLURB HoC metric: F1 pooled over all (document, hallmark) pairs (see the module doc).

    Args:
        gold: per document, its hallmark indices (or a (documents, 10) 0/1 tensor).
        predicted: the same for the predictions.
    """
    y, p = _as_pair(gold, predicted)
    tp = float((y & p).sum())
    wrong = float((y ^ p).sum())  # false positives + false negatives
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def hallmark_macro_f1(gold: Labels, predicted: Labels) -> float:
    """The unweighted mean of the 10 per-hallmark F1s: reported beside the BLURB metric, never instead of it."""
    return float(per_hallmark_f1(gold, predicted).mean())


@dataclass(frozen=True)
class HoCResult:
    """Test scores at the decision threshold chosen on dev."""

    threshold: float
    dev_f1: float
    test_f1: float  # the BLURB metric
    test_macro_f1: float
    test_per_hallmark: tuple[float, ...]


THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def evaluate_hoc(
    dev_probs: torch.Tensor,
    dev_gold: Sequence[HoCExample],
    test_probs: torch.Tensor,
    test_gold: Sequence[HoCExample],
    thresholds: Sequence[float] = THRESHOLDS,
) -> HoCResult:
    """Choose one decision threshold on dev (the best `hoc_f1`, the lowest on ties), score test with it.

    Args:
        dev_probs: (documents, 10) sigmoid probabilities of a multi-label classifier, rows in `dev_gold`'s order.
        dev_gold: the dev documents with their gold labels.
        test_probs: the same for test, rows in `test_gold`'s order.
        test_gold: the test documents with their gold labels.
        thresholds: the candidate decision thresholds.
    """
    for probs, gold, name in ((dev_probs, dev_gold, "dev"), (test_probs, test_gold, "test")):
        if tuple(probs.shape) != (len(gold), len(HALLMARKS)):
            raise ValueError(f"{name}_probs has shape {tuple(probs.shape)}, expected ({len(gold)}, {len(HALLMARKS)})")
    dev_probs, test_probs = dev_probs.detach().cpu(), test_probs.detach().cpu()
    dev_y = label_matrix([e.labels for e in dev_gold])
    test_y = label_matrix([e.labels for e in test_gold])
    scores = [hoc_f1(dev_y, dev_probs >= t) for t in thresholds]
    best = max(range(len(thresholds)), key=lambda i: (scores[i], -i))
    predicted = test_probs >= thresholds[best]
    return HoCResult(
        threshold=thresholds[best],
        dev_f1=scores[best],
        test_f1=hoc_f1(test_y, predicted),
        test_macro_f1=hallmark_macro_f1(test_y, predicted),
        test_per_hallmark=tuple(per_hallmark_f1(test_y, predicted).tolist()),
    )

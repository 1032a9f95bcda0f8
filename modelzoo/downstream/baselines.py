"""What a fine-tuned model's downstream number must beat: trivial baselines and a small classifier.

- HoC `constant_k`: the same k most frequent training hallmarks for every abstract, k chosen on dev (the best
  BLURB F1): what a model scores that learned the label frequencies and nothing about the text.
- HoC `all_hallmarks`: every hallmark for every abstract.
- HoC `tfidf_logreg`: what a user would train instead of a language model for a small classifier: TF-IDF of word
  1-2-grams, one logistic regression per hallmark (scikit-learn, the `baselines` extra), the decision threshold
  chosen on dev as for the fine-tuned models (`evaluate_hoc`).
- PubMedQA `majority`: always the most frequent test answer (`pubmedqa.majority_baseline`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from modelzoo.downstream.hoc import HALLMARKS, HoCExample, evaluate_hoc, hoc_f1, label_matrix, load_hoc
from modelzoo.downstream.pubmedqa import load_pubmedqa, majority_baseline
from modelzoo.errors import ModelZooError


@dataclass(frozen=True)
class Baseline:
    """One baseline's test score (HoC: BLURB F1; PubMedQA: accuracy), its dev score, and how it was chosen."""

    dataset: str
    name: str
    test: float
    dev: float
    detail: str


def hoc_constant_k(train: list[HoCExample], dev: list[HoCExample], test: list[HoCExample]) -> Baseline:
    """The k most frequent training hallmarks for every abstract, k in 1..10 chosen on dev."""
    counts = Counter(label for e in train for label in e.labels)
    order = sorted(range(len(HALLMARKS)), key=lambda i: (-counts[i], i))

    def score(examples: list[HoCExample], k: int) -> float:
        return hoc_f1([e.labels for e in examples], [order[:k]] * len(examples))

    k = max(range(1, len(HALLMARKS) + 1), key=lambda k: (score(dev, k), -k))
    return Baseline("hoc", "constant_k", score(test, k), score(dev, k), f"the {k} most frequent training hallmarks")


def hoc_all_hallmarks(dev: list[HoCExample], test: list[HoCExample]) -> Baseline:
    """Every hallmark predicted for every abstract."""

    def score(examples: list[HoCExample]) -> float:
        return hoc_f1([e.labels for e in examples], [range(len(HALLMARKS))] * len(examples))

    return Baseline("hoc", "all_hallmarks", score(test), score(dev), "all 10 hallmarks for every abstract")


def hoc_tfidf_logreg(train: list[HoCExample], dev: list[HoCExample], test: list[HoCExample]) -> Baseline:
    """TF-IDF (word 1-2-grams, sublinear tf, min_df 2) + one L2 logistic regression per hallmark; threshold on dev."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
    except ImportError as e:
        raise ModelZooError('the TF-IDF baseline needs scikit-learn: pip install -e ".[baselines]"') from e
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vectorizer.fit_transform([e.text for e in train])
    y_train = label_matrix([e.labels for e in train]).numpy()
    classifier = OneVsRestClassifier(LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced"))
    classifier.fit(x_train, y_train)

    def probabilities(examples: list[HoCExample]) -> torch.Tensor:
        return torch.from_numpy(classifier.predict_proba(vectorizer.transform([e.text for e in examples])))

    result = evaluate_hoc(probabilities(dev), dev, probabilities(test), test)
    detail = (
        f"{x_train.shape[1]:,} features, C=10, balanced classes, threshold {result.threshold:.2f} (dev); "
        f"per-hallmark macro-F1 {result.test_macro_f1:.3f}"
    )
    return Baseline("hoc", "tfidf_logreg", result.test_f1, result.dev_f1, detail)


def pubmedqa_majority(data_dir: str | Path) -> Baseline:
    """Always the most frequent answer of the 500 test questions (dev: of the fold-0 dev questions)."""
    label, accuracy = majority_baseline(load_pubmedqa(data_dir, "test"))
    _, dev = majority_baseline(load_pubmedqa(data_dir, "dev"))
    return Baseline("pubmedqa", "majority", accuracy, dev, f"always {label!r}")


def all_baselines(hoc_dir: str | Path, pubmedqa_dir: str | Path) -> list[dict]:
    """Every baseline above, as dicts (the reproduction report's `baselines.json`)."""
    train, dev, test = (load_hoc(hoc_dir, split) for split in ("train", "dev", "test"))
    baselines = [
        hoc_constant_k(train, dev, test),
        hoc_all_hallmarks(dev, test),
        hoc_tfidf_logreg(train, dev, test),
        pubmedqa_majority(pubmedqa_dir),
    ]
    return [asdict(b) for b in baselines]

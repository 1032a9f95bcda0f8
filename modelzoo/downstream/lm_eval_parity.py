"""Compare our PubMedQA scores with lm-evaluation-harness's per-question log-likelihoods (`--log_samples`).

lm-eval writes one JSON line per question to `samples_<task>_<time>.jsonl`: the document (with `pubid`), and
`filtered_resps`, one `[log-likelihood, is_greedy]` per choice in `doc_to_choice` order. `compare` matches those
questions to ours by PMID (`predictions/*.jsonl` of `modelzoo evaluate`, or `PubMedQAResult.questions`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modelzoo.downstream.pubmedqa import CHOICES
from modelzoo.downstream.records import field, read_jsonl
from modelzoo.errors import DataError


@dataclass(frozen=True)
class Parity:
    """How far apart two evaluations of the same questions are."""

    n: int
    max_abs_diff: float  # largest |ours - theirs| over every question's three log-likelihoods
    same_predictions: int
    our_accuracy: float
    their_accuracy: float

    def format(self) -> str:
        return (
            f"{self.n} questions: accuracy ours {self.our_accuracy:.4f}, lm-eval {self.their_accuracy:.4f}; "
            f"same prediction on {self.same_predictions}/{self.n}; largest log-likelihood difference "
            f"{self.max_abs_diff:.2e}"
        )


def read_lm_eval_samples(path: str | Path) -> dict[str, list[float]]:
    """PMID -> lm-eval's log-likelihoods of yes / no / maybe, from a `samples_*.jsonl` file."""
    path = Path(path)
    return lm_eval_scores(read_jsonl(path), path)


def lm_eval_scores(samples: Iterable[tuple[int, dict]], where: str | Path = "samples") -> dict[str, list[float]]:
    """PMID -> log-likelihoods of lm-eval samples given as (line or index, sample); also takes the `samples`
    that `lm_eval.simple_evaluate(..., log_samples=True)` returns."""
    scores = {}
    for line, record in samples:
        doc = field(record, "doc", dict, where, line)
        responses = field(record, "filtered_resps", list, where, line)
        if len(responses) != len(CHOICES):
            raise DataError(where, f"{len(responses)} responses, expected one per choice {CHOICES}", line)
        scores[str(field(doc, "pubid", (str, int), where, line))] = [float(r[0]) for r in responses]
    return scores


def read_predictions(path: str | Path) -> list[dict]:
    """Per-question records of `modelzoo evaluate` (`predictions/*.jsonl`)."""
    return [record for _, record in read_jsonl(Path(path))]


def compare(ours: Sequence[dict], theirs: dict[str, list[float]]) -> Parity:
    """Match questions by PMID; every one of ours must be in lm-eval's samples.

    Raises:
        DataError: a question of ours that lm-eval did not score.
    """
    missing = [q["pubid"] for q in ours if q["pubid"] not in theirs]
    if missing:
        raise DataError("lm-eval samples", f"{len(missing)} of our questions are missing, e.g. PMID {missing[0]}")
    diff, same, our_right, their_right = 0.0, 0, 0, 0
    for q in ours:
        mine = [q["scores"][c] for c in CHOICES]
        other = theirs[q["pubid"]]
        diff = max(diff, *(abs(a - b) for a, b in zip(mine, other, strict=True)))
        their_choice = CHOICES[max(range(len(CHOICES)), key=lambda i: (other[i], -i))]  # numpy argmax: first max
        same += their_choice == q["predicted"]
        our_right += q["predicted"] == q["label"]
        their_right += their_choice == q["label"]
    n = len(ours)
    return Parity(n, diff, same, our_right / n, their_right / n)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m modelzoo.downstream.lm_eval_parity <our predictions.jsonl> <lm-eval samples.jsonl>`."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ours", type=Path, help="predictions/<i>-<model>.jsonl written by modelzoo evaluate")
    parser.add_argument("theirs", type=Path, help="samples_pubmedqa*_<time>.jsonl written by lm_eval --log_samples")
    args = parser.parse_args(argv)
    print(compare(read_predictions(args.ours), read_lm_eval_samples(args.theirs)).format())


if __name__ == "__main__":
    main()

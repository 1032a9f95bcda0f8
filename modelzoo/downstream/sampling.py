"""`task.limit`: a stratified, seeded sample of a labelled split, never its first N (PubMedQA's test file is sorted
by label: its first 276 questions are all "yes")."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
SEED = 0  # one sample for every run and model, so limited runs compare on the same examples


def stratified_sample(examples: Sequence[T], limit: int, stratum: Callable[[T], Hashable], what: str) -> list[T]:
    """`limit` of `examples` (all of them when `limit` is 0 or covers them), each stratum (label) represented in
    proportion to its size (largest remainders), the examples within it drawn by a generator seeded with `SEED`;
    kept in their file order. Logs what was drawn, naming `what` (e.g. "PubMedQA test questions")."""
    if not limit or limit >= len(examples):
        return list(examples)
    groups: dict[Hashable, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(stratum(example), []).append(index)
    shares = {key: limit * len(indices) / len(examples) for key, indices in groups.items()}
    quotas = {key: int(share) for key, share in shares.items()}
    by_remainder = sorted(groups, key=lambda key: (quotas[key] - shares[key], str(key)))
    for key in by_remainder[: limit - sum(quotas.values())]:
        quotas[key] += 1
    rng = random.Random(SEED)
    chosen = sorted(i for key, indices in groups.items() for i in rng.sample(indices, quotas[key]))
    drawn = Counter(stratum(examples[i]) for i in chosen)
    log.info(
        "task.limit=%d: a stratified random sample (seed %d) of the %d %s, by label: %s",
        limit,
        SEED,
        len(examples),
        what,
        ", ".join(f"{key} {drawn[key]}" for key in sorted(drawn, key=str)),
    )
    return [examples[i] for i in chosen]

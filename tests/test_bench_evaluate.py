"""bench/evaluate.py on a tiny export: both variants measured, same answers, a report with the ratio."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from modelzoo.downstream.pubmedqa import load_pubmedqa
from modelzoo.export.hf import export_hf
from tests.conftest import needs_shared
from tests.test_downstream_data import PQA
from tests.test_export import make_model, make_tokenizer

BENCH = Path(__file__).resolve().parent.parent / "bench"


@needs_shared
def test_evaluate_bench_measures_ours_and_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their sibling `common` as scripts do
    bench = importlib.import_module("evaluate")
    directory = export_hf(make_model(sparse=True), tmp_path / "hf", tokenizer=make_tokenizer())
    variants = bench.load_variants(directory)
    assert variants["ours"].kind == "hf (ours)" and variants["transformers"].kind == "transformers"
    examples = load_pubmedqa(PQA, "test")[:3]
    timings, results = bench.measure(variants, examples, batch_size=2, repeats=1)
    assert set(timings) == set(results) == {"ours", "transformers"}
    args = argparse.Namespace(batch_size=2, repeats=1)
    text = bench.report(directory, 64, timings, results, args)
    assert "ours vs transformers" in text and "same prediction on 3/3 questions" in text

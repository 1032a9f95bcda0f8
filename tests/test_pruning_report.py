"""`scripts/pruning_report.py`'s rendering: mean ± std over seeds, distilled rows, one family's part at a time."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pruning_report.py"


@pytest.fixture(scope="module")
def report():  # a script, not a package module: loaded from its file
    spec = importlib.util.spec_from_file_location("pruning_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(family: str, control, recovered) -> dict:
    """A small results file: dense 100, SparseGPT 110 / Wanda 120 / magnitude 115 at every target."""
    cells = {"sparsegpt": 110.0, "wanda": 120.0, "magnitude": 115.0}
    return {
        "command": "python scripts/pruning_report.py ckpt",
        "date": "2026-12-07",
        "torch": "2.13.0+cpu",
        "checkpoint": "runs/x/checkpoints/step_000300",
        "model": f"{family}_tiny (4 layers, d_model 128, ffn 352, vocab 4096)",
        "family": family,
        "layers": ["self_attn.q_proj", "mlp.down_proj"],
        "blocks": 4,
        "dense_command": "modelzoo pretrain model=llama_tiny sparsity=dense task.max_steps=300",
        "dense_steps": 300,
        "batch": 16,
        "seq_len": 128,
        "seed": 1234,
        "samples": 128,
        "validation_blocks": 128,
        "validation_total": 421,
        "steps": 40,
        "lr": 0.0005,
        "warmup": 4,
        "dense": 100.0,
        "feature_norm_spread": 2.0,
        "pruned": {
            t: {m: {"ppl": p, "error": 0.1, "seconds": 1.0, "sparsity": 0.5} for m, p in cells.items()}
            for t in ("50%", "70%", "2:4")
        },
        "recovered": recovered,
        "control": control,
        "results_file": f"runs/{family}/results.json",
    }


def run(seed: int, ppl: float, seconds: float = 10.0) -> dict:
    return {"seed": seed, "ppl": ppl, "sparsity": 0.5, "seconds": seconds}


def test_mean_std_formatting(report):
    assert report.fmt([1.0], ".2f") == "1.00"
    assert report.fmt([1.0, 2.0, 3.0], ".2f") == "2.00 ± 1.00"  # the sample standard deviation (n - 1)
    assert report.fmt([-1.0, -3.0], "+.2f") == "-2.00 ± 1.41"  # the sign on the mean only
    assert report.fmt([0.8, 0.6], ".0%") == "70% ± 14%"


def test_llama_part_with_seeds_and_distillation_keeps_the_other_family(report):
    recovered = {"50%": {"lm": [run(1, 105.0), run(2, 107.0)], "distill": [run(1, 103.0, 15.0), run(2, 107.0, 15.0)]}}
    llama = results("llama", [run(1, 101.0), run(2, 103.0)], recovered)
    gpt_part = "\n".join([*report.markers("gpt")[:1], "", "hand-kept GPT text", "", report.markers("gpt")[1]])
    page = report.render([llama], "\n".join([*report.header(), gpt_part, ""]))

    assert gpt_part in page  # a family not given is kept verbatim, before the Llama part
    assert page.index(gpt_part) < page.index(report.markers("llama")[0])
    # gaps after, seed by seed against the control of the same seed: plain 4, 4; distilled 2, 4
    assert "| SparseGPT 50% | 50.0% | 110.00 | 106.00 ± 1.41 | +10.00 | +4.00 ± 0.00 | 60% ± 0% | 81,920 |" in page
    assert "| SparseGPT 50%, distilled | 50.0% | 110.00 | 105.00 ± 2.83 | +10.00 | +3.00 ± 1.41 | 70% ± 14% |" in page
    assert "| dense control | dense | 100.00 | 102.00 ± 1.41 | - | - | - | 81,920 |" in page
    assert "no consistent effect" in page and "lower in 1 of 2 seeds" in page
    assert "1.50x the wall time of the plain run" in page
    assert "the first 128 of the 421 blocks" in page and "RMSNorms" in page

    again = report.render([llama], page)  # re-rendering replaces the family's part instead of adding one
    assert again == page


def test_one_seed_results_of_the_first_layout_render_without_std(report):
    gpt = results("gpt", 102.0, {"50%": {"ppl": 106.0, "sparsity": 0.5}})
    for key in ("family", "layers", "validation_total", "dense_command"):
        del gpt[key]  # saved before these existed
    gpt["validation_blocks"] = 421
    page = report.render([gpt])

    assert "| SparseGPT 50% | 50.0% | 110.00 | 106.00 | +10.00 | +4.00 | 60% | 81,920 |" in page
    part = report.parts(page)["gpt"]
    assert "±" not in part and ", distilled" not in part and "seeds" not in part
    assert "`modelzoo pretrain sparsity=dense task.max_steps=300`" in page
    assert "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj of every block" in page and "all 421 blocks" in page


def test_seeds_measured_by_separate_processes_pool(report):
    def one_seed(seed: int, plain: float, distilled: float, control: float) -> dict:
        recovered = {"50%": {"lm": [run(seed, plain)], "distill": [run(seed, distilled, 15.0)]}}
        r = results("llama", [run(seed, control)], recovered)
        return {**r, "results_file": f"runs/seed{seed}/results.json", "command": f"measure --seeds {seed}"}

    both = report.render([one_seed(1, 105.0, 103.0, 101.0), one_seed(2, 107.0, 107.0, 103.0)])
    assert "| SparseGPT 50%, distilled | 50.0% | 110.00 | 105.00 ± 2.83 | +10.00 | +3.00 ± 1.41 | 70% ± 14% |" in both
    assert "measure --seeds 1\nmeasure --seeds 2\n" in both
    assert "--render runs/seed1/results.json runs/seed2/results.json" in both

    other = one_seed(2, 107.0, 107.0, 103.0)
    other["pruned"]["70%"]["wanda"]["ppl"] = 121.0  # not the same one-shot measurement
    with pytest.raises(ValueError, match=r"seed2/results\.json: its one-shot perplexities differ"):
        report.render([one_seed(1, 105.0, 103.0, 101.0), other])
    with pytest.raises(ValueError, match="its seed 1 control differs"):
        report.render([one_seed(1, 105.0, 103.0, 101.0), {**one_seed(1, 1.0, 1.0, 1.0), "results_file": "b.json"}])
    with pytest.raises(ValueError, match="a seed of its 50% runs is also in"):
        report.render([one_seed(1, 105.0, 103.0, 101.0), {**one_seed(1, 1.0, 1.0, 101.0), "results_file": "b.json"}])

    other_target = {**one_seed(1, 105.0, 103.0, 101.0), "results_file": "b.json"}  # 2:4 continued by another process
    other_target["recovered"] = {"2:4": other_target["recovered"].pop("50%")}
    page = report.render([one_seed(1, 105.0, 103.0, 101.0), other_target])
    assert "| SparseGPT 2:4, distilled |" in page and "| dense control | dense | 100.00 | 101.00 |" in page


def test_an_interrupted_measurement_renders_the_runs_done(report):
    recovered = {"50%": {"lm": [run(1, 105.0)], "distill": [run(1, 103.0, 15.0)]}, "70%": {"lm": [], "distill": []}}
    page = report.render([results("llama", [run(1, 101.0)], recovered)])

    assert "| SparseGPT 50%, distilled |" in page and "SparseGPT 70% |" not in page
    assert "closes 60% of the SparseGPT 50% model's gap" in page and "lower in 1 of 1 seeds" in page


def test_one_shot_reuse_refuses_other_settings(report, tmp_path):
    source = tmp_path / "results.json"
    source.write_text(json.dumps(results("llama", [run(1, 101.0)], {"50%": {"lm": [run(1, 105.0)]}})))
    ckpt = "runs/x/checkpoints/step_000300"
    same = report.parse_args([ckpt, "--samples", "128", "--val-blocks", "128", "--one-shot-from", str(source)])
    assert report.reused_one_shot(same)["pruned"]["50%"]["sparsegpt"]["ppl"] == 110.0
    for argv, key in (
        (["--samples", "64", "--val-blocks", "128"], "samples"),
        (["--samples", "128"], "validation_blocks"),
    ):
        args = report.parse_args([ckpt, *argv, "--one-shot-from", str(source)])
        with pytest.raises(SystemExit, match=f"its {key} is"):
            report.reused_one_shot(args)


def test_a_gap_within_the_seed_noise_is_flagged(report):
    quiet = results("llama", [run(1, 101.0), run(2, 103.0)], {"50%": {"lm": [run(1, 105.0), run(2, 107.0)]}})
    noisy = results("llama", [run(1, 101.0), run(2, 103.0)], {"50%": {"lm": [run(1, 105.0), run(2, 117.0)]}})
    assert "Within the noise" not in report.render([quiet])  # gaps after 4 and 4: no spread
    assert "the one-shot gap (+10.00) is below twice the seed-to-seed standard deviation of the gap after (7.07)" in (
        report.render([noisy])  # gaps after 4 and 14
    )


def test_a_distilled_model_below_the_dense_control_is_said(report):
    recovered = {"50%": {"lm": [run(1, 105.0), run(2, 107.0)], "distill": [run(1, 100.0), run(2, 102.0)]}}
    page = report.render([results("llama", [run(1, 101.0), run(2, 103.0)], recovered)])
    assert "helps at every target, in every seed" in page
    assert "The distilled 50% model ends below the dense control (-1.00 ± 0.00), which moved 100.00 -> 102.00" in page

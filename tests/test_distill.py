"""Distillation during pre-training (`task.distill`): the loss terms by hand, a frozen teacher, runs on GPT and
Llama that train, log the terms, export and resume exactly, and the refusals naming their keys."""

from __future__ import annotations

import copy
import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelzoo.config.train import DistillConfig
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.memory import FP32, memory_plan
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.models.llama import Llama, LlamaConfig
from modelzoo.tasks.pretrain import COLUMNS, Pretraining
from modelzoo.train.distill import Distiller, hidden_loss, kd_loss, teacher_config
from tests.conftest import killed_at_step, make_config, train_losses

TERMS = ("lm_loss", "kd_loss", "hidden_loss")
SHORT = ("task.max_steps=4", "task.checkpoint_every=2", "task.eval_every=2", "task.log_every=1")


def test_kd_loss_is_tempered_kl_of_teacher_from_student_scaled_by_t_squared() -> None:
    """Two tokens over three ids at T=2, summed by hand: KL(teacher || student), not the reverse, times T^2 = 4,
    averaged over tokens (not summed, not over ids)."""
    student = torch.tensor([[[0.0, 2.0, 4.0], [1.0, 1.0, 1.0]]])
    teacher = torch.tensor([[[4.0, 2.0, 0.0], [0.0, 0.0, 6.0]]])

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(x / 2) for x in row]
        return [x / sum(e) for x in e]

    kls = []
    for s, t in zip(student[0].tolist(), teacher[0].tolist(), strict=True):
        p, q = softmax(t), softmax(s)
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    expected = 4 * sum(kls) / 2
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    reverse = 4 * sum(
        sum(qi * math.log(qi / pi) for pi, qi in zip(softmax(t), softmax(s), strict=True))
        for s, t in zip(student[0].tolist(), teacher[0].tolist(), strict=True)
    )
    assert abs(reverse - expected) > 0.1  # the hand values tell the two directions apart


def test_hidden_loss_normalises_each_layer_by_the_teacher_and_averages_over_layers() -> None:
    """Layer 1: |(1,2)-(1,0)|^2 / |(1,0)|^2 = 4; layer 2: |(0,0)-(2,2)|^2 / |(2,2)|^2 = 1; the mean is 2.5 (a sum
    over layers gives 5, unnormalised MSEs (2 + 4) / 2 = 3, normalising by the student 4/5 and 8/0)."""
    student = [torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.0, 0.0]]])]
    teacher = [torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0, 2.0]]])]
    assert hidden_loss(student, teacher).item() == pytest.approx(2.5)


@pytest.mark.parametrize(
    "model",
    [
        GPT(GPTConfig(name="t", n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=16, vocab_size=50)),
        Llama(LlamaConfig(name="t", n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=16, vocab_size=50)),
    ],
    ids=["gpt", "llama"],
)
def test_teacher_equal_to_student_gives_zero_terms_and_gradients_reach_only_the_student(model: GPT) -> None:
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    model.eval()  # no dropout: the two forward passes are the same function
    distiller = Distiller(DistillConfig(teacher="unused"), model, teacher)
    assert distiller.hidden_weight == 2  # null: the number of layers
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = distiller.loss(model, x, y)
    terms = distiller.take_terms()
    assert terms["kd_loss"].item() == 0.0 and terms["hidden_loss"].item() == 0.0
    assert loss.item() == pytest.approx(terms["lm_loss"].item())
    assert distiller.take_terms() == {}  # taken once per step
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_gpt_distillation_run_logs_terms_exports_and_refuses_a_changed_teacher(
    trained_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """The shared sparse `trained_run`'s export is the teacher; the default columns stay those without a teacher."""
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_run / "hf", teacher)
    run = tmp_path / "student"
    student = Pretraining(make_config(run, cache_dir, *SHORT, "sparsity=static_50", f"task.distill.teacher={teacher}"))
    frozen = student.distiller.teacher
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    optimized = {id(p) for group in student.loop.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in frozen.parameters()}
    student.fit()
    rows = metrics(run)
    assert tuple(rows[0])[: 3 + len(TERMS)] == ("step", "tokens", "train_loss", *TERMS)
    for row in rows:
        lm, kd, hidden = (float(row[name]) for name in TERMS)
        assert float(row["train_loss"]) == pytest.approx(lm + kd + 2 * hidden, rel=1e-6)  # weights 1, 1, n_layer
    assert (run / "hf" / "model.safetensors").is_file()
    assert tuple(metrics(trained_run)[0]) == (*COLUMNS, "mfu", "peak_mem_gib")

    weights = load_file(teacher / "model.safetensors")
    save_file({k: v + 1e-3 for k, v in weights.items()}, teacher / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"task\.distill\.teacher="):
        Pretraining(
            make_config(
                run,
                cache_dir,
                *SHORT,
                "task.max_steps=6",
                "sparsity=static_50",
                f"task.distill.teacher={teacher}",
                "task.resume=true",
            )
        )
    with pytest.raises(CheckpointError, match=r"task\.distill\.teacher="):  # nor may the teacher be dropped
        Pretraining(make_config(run, cache_dir, *SHORT, "task.max_steps=6", "sparsity=static_50", "task.resume=true"))


LLAMA = (
    "model=llama_tiny",
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "model.n_kv_head=1",
    "model.n_inner=128",
    "model.n_positions=64",
    "model.vocab_size=1024",
)


def test_llama_distillation_from_our_run_resumes_bit_exactly(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dense llama teacher run (read through its checkpoint), a 50% sparse student killed at step 3 and resumed:
    the same losses and terms bit for bit as uninterrupted (the teacher draws no random numbers)."""
    teacher = tmp_path / "teacher"
    dense = ("sparsity=dense", "task.max_steps=2", "task.export=false")
    Pretraining(make_config(teacher, cache_dir, *LLAMA, *dense)).fit()
    student = (*LLAMA, *SHORT, "sparsity=static_50", "task.export=false", f"task.distill.teacher={teacher}")
    Pretraining(make_config(tmp_path / "full", cache_dir, *student)).fit()
    with killed_at_step(monkeypatch, 3):
        Pretraining(make_config(tmp_path / "crashed", cache_dir, *student)).fit()
    Pretraining(make_config(tmp_path / "crashed", cache_dir, *student, "task.resume=true")).fit()
    assert train_losses(tmp_path / "crashed") == train_losses(tmp_path / "full")
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "crashed")
    assert [[r[t] for t in TERMS] for r in resumed] == [[r[t] for t in TERMS] for r in full]
    assert float(full[-1]["hidden_loss"]) > 0


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (("task.distill.temperature=0",), "task.distill.temperature", "must be positive"),
        (("task.distill.logit_weight=-1",), "task.distill.logit_weight", "must be >= 0"),
        (
            ("task.distill.lm_weight=0", "task.distill.logit_weight=0", "task.distill.hidden_weight=0"),
            "task.distill.lm_weight",
            "all 0",
        ),
        (("model.vocab_size=2048",), "task.distill.teacher", "vocab_size 1024 but model.vocab_size=2048"),
        (("model.n_layer=3",), "task.distill.teacher", "n_layer=2 but model.n_layer=3.*hidden_weight=0"),
    ],
)
def test_bad_distill_keys_are_refused_naming_them(
    trained_run: Path, tmp_path: Path, cache_dir: Path, overrides: tuple[str, ...], key: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: .*{message}"):
        make_config(tmp_path / "run", cache_dir, f"task.distill.teacher={trained_run}", *overrides)


def test_a_teacher_of_another_depth_is_allowed_for_the_logits_alone_and_a_missing_one_is_refused(
    trained_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    make_config(
        tmp_path / "run",
        cache_dir,
        f"task.distill.teacher={trained_run}",
        "model.n_layer=3",
        "task.distill.hidden_weight=0",
    )
    with pytest.raises(ConfigError, match=r"^task\.distill\.teacher: .*missing is neither a run directory"):
        make_config(tmp_path / "run", cache_dir, f"task.distill.teacher={tmp_path / 'missing'}")


@pytest.mark.parametrize("student", [(), ("model=llama_tiny", "model.n_kv_head=1")], ids=["gpt", "llama"])
def test_cerebras_refuses_distillation_by_capability(
    trained_run: Path, tmp_path: Path, cache_dir: Path, student: tuple[str, ...]
) -> None:
    """backend=cerebras has no distillation (`Capabilities.distillation`) for either family's student: refused at
    config time, naming the key and the backends that have it, before the teacher is read."""
    with pytest.raises(ConfigError, match=r"^task\.distill\.teacher: cerebras .*allowed: masked_dense"):
        make_config(tmp_path / "run", cache_dir, "backend=cerebras", *student, f"task.distill.teacher={trained_run}")


def test_memory_plan_counts_the_frozen_teacher(trained_run: Path) -> None:
    """The teacher adds its fp32 weights and the outputs the loss keeps, and nothing to gradients or AdamW."""
    student = LlamaConfig(name="s", n_layer=2, n_embd=64, n_head=2, n_inner=128, n_positions=64, vocab_size=1024)
    teacher = teacher_config(str(trained_run))
    assert isinstance(teacher, GPTConfig) and teacher.n_layer == 2
    plain = memory_plan(student, None, "fp32", 4, 64)
    plan = memory_plan(student, None, "fp32", 4, 64, teacher, teacher_hidden=True)
    added = dict(plan.items[len(plain.items) :])
    assert plan.items[: len(plain.items)] == plain.items
    assert added["distillation teacher weights (fp32, frozen)"] == FP32 * GPT(teacher).num_params(False)
    per_token = FP32 * teacher.padded_vocab_size + 2 * FP32 * 1024 + 2 * FP32 * 64 * 2
    assert added["distillation: teacher outputs kept for the loss"] == per_token * 4 * 64

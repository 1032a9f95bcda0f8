"""Knowledge distillation during (sparse continued) pre-training: a frozen teacher and SquareHead's loss.

The Sparse-Llama-3.1-8B-2of4 recipe prunes a dense model (SparseGPT 2:4) and recovers it by continued pre-training
with the dense model as teacher, using SquareHead (Kurtic et al. 2023, "Sparse Fine-tuning for Inference
Acceleration of Large Language Models", arXiv 2310.06927). Per micro-batch the student's loss is

    lm_weight x CE(student logits, next tokens)                                                     (lm_loss)
    + logit_weight x T^2 x mean over tokens of KL(softmax(teacher / T) || softmax(student / T))     (kd_loss)
    + hidden_weight x mean over blocks l of MSE(student h_l, teacher h_l) / MSE(teacher h_l, 0)     (hidden_loss)

where h_l is block l's output (the residual stream after it) and each MSE runs over the whole micro-batch, as
llm-compressor's `square_head` comparison did. The T^2 keeps the logit term's gradients at the same scale for any
temperature (Hinton et al. 2015). `hidden_weight` null is the number of layers: llm-compressor scaled its mean over
layers by it, which is the paper's sum over layers.

The teacher is one of our models (an HF GPT-2 / Llama directory or one of our runs, loaded as `generate` loads one):
frozen (no gradients, so no optimizer state), in eval mode, on the student's device, run under the step's autocast
and `torch.no_grad()` on the same micro-batches. It is never wrapped in DDP nor checkpointed: each rank runs its own
copy, and a resume checks the teacher's identity (`teacher_identity`) instead. Block outputs are caught with forward
hooks on `model.blocks` (`BlockOutputs`), so the model files know nothing of distillation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from modelzoo import checkpoint as ckpt
from modelzoo.config.train import DistillConfig
from modelzoo.errors import ConfigError
from modelzoo.export.hf import from_hf_config
from modelzoo.inference import is_hf_dir, load_for_inference
from modelzoo.models.registry import CausalLM, ModelConfig
from modelzoo.restore import saved_config

KEY = "task.distill.teacher"
WHOLE_FILE_BYTES = 64 * 2**20  # files up to this size are hashed whole in the teacher's identity
SAMPLE_BYTES = 2**20  # of larger ones (weights), the first and last MiB with the size


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x the mean over tokens of KL(teacher || student) of the token distributions at temperature T, in fp32.

    Args:
        student_logits: (..., vocab).
        teacher_logits: (..., vocab), the same shape.
        temperature: T > 0.
    """
    student = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)  # (N, V)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """SquareHead's term: per block, MSE(student, teacher) / MSE(teacher, 0) over the micro-batch, averaged over
    blocks, in fp32."""
    ratios = [
        (s.float() - t.float()).square().sum() / t.float().square().sum() for s, t in zip(student, teacher, strict=True)
    ]
    return torch.stack(ratios).mean()


class BlockOutputs:
    """The output of each of a model's blocks in its latest forward pass, kept by forward hooks on `model.blocks`.

    The hooks are put on once, before the model is compiled, and stay on; `take` hands the outputs over and drops
    the references (an evaluation's forward passes leave theirs until the next training micro-batch replaces them).
    """

    def __init__(self, model: CausalLM) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * len(model.blocks)
        for i, block in enumerate(model.blocks):
            block.register_forward_hook(partial(self._keep, i))

    def _keep(self, i: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.outputs[i] = output

    def take(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, [None] * len(self.outputs)
        return outputs


class Distiller:
    """The distillation loss of a student against a frozen `teacher` (module docstring), and the mean of each of its
    terms over the micro-batches since they were last taken (`take_terms`)."""

    def __init__(self, config: DistillConfig, student: CausalLM, teacher: CausalLM) -> None:
        self.config, self.teacher = config, teacher
        self.hidden_weight = student.config.n_layer if config.hidden_weight is None else config.hidden_weight
        self.terms = ("lm_loss", "kd_loss", *(("hidden_loss",) if self.hidden_weight else ()))
        self.blocks = (BlockOutputs(student), BlockOutputs(teacher)) if self.hidden_weight else None
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def loss(
        self, forward: Callable[..., tuple[torch.Tensor, torch.Tensor]], inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The weighted loss of one micro-batch: the student through `forward` (its DDP or compiled form), the
        teacher under no_grad, both under the caller's autocast."""
        logits, lm = forward(inputs, targets)
        with torch.no_grad():
            teacher_logits, _ = self.teacher(inputs)
        c = self.config
        terms = {"lm_loss": lm, "kd_loss": kd_loss(logits, teacher_logits, c.temperature)}
        loss = c.lm_weight * lm + c.logit_weight * terms["kd_loss"]
        if self.blocks:
            student, teacher = self.blocks
            terms["hidden_loss"] = hidden_loss(student.take(), teacher.take())
            loss = loss + self.hidden_weight * terms["hidden_loss"]
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach()
        self._count += 1
        return loss

    def take_terms(self) -> dict[str, torch.Tensor]:
        """Each term's mean over the micro-batches since the last call (on this rank, on the device), then reset."""
        terms = {name: total / self._count for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return terms


def teacher_source(path: str) -> Path:
    """The directory `task.distill.teacher` names: an HF directory, or the checkpoint a run or checkpoint stands for."""
    return Path(path) if is_hf_dir(path) else ckpt.find_checkpoint(path, KEY)


def teacher_config(path: str) -> ModelConfig:
    """The teacher's model config, read without loading its weights."""
    source = teacher_source(path)
    if is_hf_dir(source):
        return from_hf_config(AutoConfig.from_pretrained(source, local_files_only=True), "teacher")
    return saved_config(source).model


def check_teacher(student: ModelConfig, config: DistillConfig) -> None:
    """`task.distill.*` valid, and the teacher's shape one the student can be distilled from: the same vocabulary
    (for the logit term) and, for the hidden term, the same number of layers and width.

    Raises:
        ConfigError: naming the key.
    """
    if config.temperature <= 0:
        raise ConfigError("task.distill.temperature", f"must be positive, got {config.temperature}")
    weights = {"lm_weight": config.lm_weight, "logit_weight": config.logit_weight}
    if config.hidden_weight is not None:
        weights["hidden_weight"] = config.hidden_weight
    for name, weight in weights.items():
        if weight < 0:
            raise ConfigError(f"task.distill.{name}", f"must be >= 0, got {weight}")
    if not config.lm_weight + config.logit_weight + (config.hidden_weight or 0) and config.hidden_weight is not None:
        raise ConfigError("task.distill.lm_weight", "lm_weight, logit_weight and hidden_weight are all 0: no loss")
    teacher = teacher_config(config.teacher)
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            KEY,
            f"{config.teacher} has vocab_size {teacher.vocab_size} but model.vocab_size={student.vocab_size}: a "
            "teacher must share the student's tokenizer",
        )
    if config.hidden_weight != 0:
        for key in ("n_layer", "n_embd"):
            if getattr(teacher, key) != getattr(student, key):
                raise ConfigError(
                    KEY,
                    f"{config.teacher} has {key}={getattr(teacher, key)} but model.{key}={getattr(student, key)}: "
                    "the hidden-state term compares block by block; set task.distill.hidden_weight=0 to distil "
                    "the logits alone",
                )


def build_distiller(
    config: DistillConfig, student: CausalLM, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> Distiller:
    """The `Distiller` of `student` with the frozen teacher of `config` on `device`; a teacher with another
    tokenizer than the run's is refused naming `task.distill.teacher`."""
    loaded = load_for_inference(config.teacher, KEY, "cpu", "fp32", "none")
    if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            KEY,
            f"{loaded.source} has another tokenizer than the run's ({len(loaded.tokenizer)} vs {len(tokenizer)} "
            "tokens, or the same count mapped to other ids): train with the teacher's tokenizer (tokenizer=gpt2 "
            "tokenizer.path=<its directory>) or distil from a teacher trained with this one",
        )
    teacher = loaded.model.requires_grad_(False).to(device).eval()
    return Distiller(config, student, teacher)


def teacher_identity(path: str) -> dict[str, str]:
    """What a resumed run must share with its checkpoint about the teacher: the directory read and a sha256 of its
    files (names, sizes and contents; of a file over 64 MiB, its first and last MiB)."""
    source = teacher_source(path).resolve()
    digest = hashlib.sha256()
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(source)}\0{size}\0".encode())
        with file.open("rb") as f:
            if size <= WHOLE_FILE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(SAMPLE_BYTES))
                f.seek(size - SAMPLE_BYTES)
                digest.update(f.read())
    return {"path": str(source), "sha256": digest.hexdigest()}

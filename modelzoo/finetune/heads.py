"""The two downstream tasks as training heads: what trains, its loss on a batch, its dev/test metrics, its export.

- PubMedQA (`LMHead`): generative; loss on the answer tokens after lm-eval's prompt; scored as lm-eval scores
  it, the choice (yes/no/maybe) of highest log-likelihood; selection by dev accuracy; accuracy and macro-F1.
- HoC (`HoCHead`): a 10-way multi-label head on the last token, BCE loss; the decision threshold is chosen
  on dev (the one maximising the HoC F1) and applied unchanged to test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelzoo.downstream.hoc import HALLMARKS, hoc_f1, load_hoc
from modelzoo.downstream.pubmedqa import CHOICES, load_pubmedqa, pubmedqa_prompt
from modelzoo.downstream.scoring import choice_loglikelihoods
from modelzoo.export.hf import export_hf
from modelzoo.export.peft import save_prompt_adapter
from modelzoo.export.seq_cls import export_seq_cls
from modelzoo.finetune.config import FinetuneConfig, PromptTuneConfig
from modelzoo.finetune.data import encode_answer, encode_text, multi_hot, pad
from modelzoo.finetune.pretrained import Pretrained
from modelzoo.models.classifier import GPTClassifier
from modelzoo.models.soft_prompt import PromptedLM, SoftPrompt

THRESHOLDS = tuple(i / 100 for i in range(5, 100, 5))


def macro_f1(predicted: torch.Tensor, gold: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of the per-class F1 (a class never predicted nor gold scores 0)."""
    scores = []
    for c in range(num_classes):
        tp = int(((predicted == c) & (gold == c)).sum())
        denominator = int((predicted == c).sum()) + int((gold == c).sum())
        scores.append(2 * tp / denominator if denominator else 0.0)
    return sum(scores) / num_classes


@dataclass
class LMHead:
    """PubMedQA fine-tuning or soft prompting of a causal LM."""

    task: FinetuneConfig
    pre: Pretrained
    seq_len: int
    prompt: SoftPrompt | None = None
    splits: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        source = self.task.data_dir
        self.splits = {s: load_pubmedqa(source, s) for s in ("train", "dev", "test")}
        tok = self.pre.tokenizer
        self.train = [
            encode_answer(tok, pubmedqa_prompt(e, self.task.with_long_answer), e.label, self.seq_len)
            for e in self.splits["train"]
        ]
        self.model: nn.Module = PromptedLM(self.pre.model, self.prompt) if self.prompt else self.pre.model

    def loss(self, batch: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
        """Mean loss over the answer tokens of the examples `batch`, and the number of input tokens."""
        examples = [self.train[i] for i in batch]
        x = pad([e.ids for e in examples], self.pre.tokenizer.pad_token_id).to(device)
        y = pad([e.targets for e in examples], -100).to(device)
        _, loss = self.model(x, y)
        return loss, sum(len(e.ids) for e in examples)

    @torch.no_grad()
    def evaluate(self, split: str, device: torch.device) -> dict[str, float]:
        self.model.eval()
        examples = self.splits[split]
        contexts = [pubmedqa_prompt(e, self.task.with_long_answer) for e in examples]

        def logits_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids.to(device))[0]

        scores = choice_loglikelihoods(
            logits_fn, self.pre.tokenizer, contexts, CHOICES, batch_size=self.task.eval_batch_size, progress=False
        )
        predicted = scores.argmax(-1).cpu()
        gold = torch.tensor([CHOICES.index(e.label) for e in examples])
        accuracy = float((predicted == gold).float().mean())
        return {"score": accuracy, "accuracy": accuracy, "macro_f1": macro_f1(predicted, gold, len(CHOICES))}

    def export(self, run_dir: Path, info: dict) -> dict[str, str]:
        hf = export_hf(self.pre.model, run_dir / "hf", self.pre.tokenizer, info)
        out = {"hf": str(hf)}
        if self.prompt is not None:
            out["adapter"] = str(_save_adapter(self.task, self.prompt, self.pre, run_dir, hf, "causal_lm", None))
        return out


@dataclass
class HoCHead:
    """HoC multi-label classification: a head (and optionally a soft prompt) on the last non-pad token."""

    task: FinetuneConfig
    pre: Pretrained
    seq_len: int
    prompt: SoftPrompt | None = None
    threshold: float = 0.5

    def __post_init__(self) -> None:
        source = self.task.data_dir
        self.splits = {s: load_hoc(source, s) for s in ("train", "dev", "test")}
        tok = self.pre.tokenizer
        self.inputs = {s: [encode_text(tok, e.text, self.seq_len) for e in ex] for s, ex in self.splits.items()}
        self.targets = {s: multi_hot([e.labels for e in ex], len(HALLMARKS)) for s, ex in self.splits.items()}
        self.model = GPTClassifier(self.pre.model, len(HALLMARKS), tok.pad_token_id, self.prompt)

    def _logits(self, split: str, batch: list[int] | range, device: torch.device) -> torch.Tensor:
        x = pad([self.inputs[split][i] for i in batch], self.pre.tokenizer.pad_token_id).to(device)
        return self.model(x)

    def loss(self, batch: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
        logits = self._logits("train", batch, device)
        loss = F.binary_cross_entropy_with_logits(logits.float(), self.targets["train"][batch].to(device))
        return loss, sum(len(self.inputs["train"][i]) for i in batch)

    @torch.no_grad()
    def probabilities(self, split: str, device: torch.device) -> torch.Tensor:
        self.model.eval()
        n, size = len(self.inputs[split]), self.task.eval_batch_size
        rows = [self._logits(split, range(i, min(n, i + size)), device) for i in range(0, n, size)]
        return torch.sigmoid(torch.cat(rows).float()).cpu()

    def evaluate(self, split: str, device: torch.device) -> dict[str, float]:
        probs = self.probabilities(split, device)
        gold = self.targets[split].bool()
        if split == "dev":  # the threshold is a dev-set choice, then held for test
            self.threshold = max(THRESHOLDS, key=lambda t: hoc_f1(probs >= t, gold))
        f1 = hoc_f1(probs >= self.threshold, gold)
        return {"score": f1, "f1": f1, "threshold": self.threshold}

    def export(self, run_dir: Path, info: dict) -> dict[str, str]:
        hf = export_seq_cls(self.model, run_dir / "hf", list(HALLMARKS), self.pre.tokenizer, info=info)
        out = {"hf": str(hf)}
        if self.prompt is not None:
            score = self.model.score.weight
            out["adapter"] = str(_save_adapter(self.task, self.prompt, self.pre, run_dir, hf, "seq_cls", score))
        return out


def _save_adapter(
    task: FinetuneConfig,
    prompt: SoftPrompt,
    pre: Pretrained,
    run_dir: Path,
    base: Path,
    task_type: str,
    score: torch.Tensor | None,
) -> Path:
    assert isinstance(task, PromptTuneConfig)
    return save_prompt_adapter(
        prompt, run_dir / "adapter", pre.model.config, task_type, base, task.init, task.init_text, score
    )

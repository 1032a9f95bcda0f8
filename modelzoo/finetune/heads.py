"""The two downstream tasks as training heads: what trains, its examples and loss, dev and test metrics, export.

- PubMedQA (`LMHead`): generative; loss on the answer tokens after lm-eval's prompt; scored as lm-eval scores
  it (`choice_loglikelihoods`: the choice yes/no/maybe of highest log-likelihood); model selection by dev
  accuracy; test accuracy and macro-F1 over the three classes.
- HoC (`HoCHead`): a 10-way multi-label head on the last non-pad token with BCE loss; `evaluate_hoc` chooses
  the decision threshold on dev (the best BLURB F1) and scores test with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelzoo.config.finetune import FinetuneConfig, PromptTuneConfig
from modelzoo.downstream.evaluate import macro_f1
from modelzoo.downstream.hoc import HALLMARKS, evaluate_hoc, load_hoc
from modelzoo.downstream.pubmedqa import CHOICES, load_pubmedqa, pubmedqa_prompt
from modelzoo.downstream.sampling import stratified_sample
from modelzoo.downstream.scoring import choice_loglikelihoods
from modelzoo.export.hf import export_hf
from modelzoo.export.peft import save_prompt_adapter
from modelzoo.export.seq_cls import export_seq_cls
from modelzoo.finetune.data import IGNORE, encode_answer, encode_text, pad
from modelzoo.models.classifier import Classifier
from modelzoo.models.soft_prompt import PromptedLM, SoftPrompt
from modelzoo.restore import Restored
from modelzoo.train.loop import Forward


class Head:
    """What a downstream task gives the fine-tuning loop: `model`, `train_size`, `example`, `loss`, `dev`, `test`,
    `export`. `pad` holds the padding values of (inputs, targets) when examples are batched."""

    model: nn.Module
    train_size: int
    pad: tuple[int, float]

    def __init__(self, task: FinetuneConfig, pre: Restored, seq_len: int, prompt: SoftPrompt | None) -> None:
        self.task, self.pre, self.seq_len, self.prompt = task, pre, seq_len, prompt
        self.pad_id = pre.tokenizer.pad_token_id

    def _adapter(self, run_dir: Path, base: Path, task_type: str, score: torch.Tensor | None) -> dict[str, str]:
        if not isinstance(self.task, PromptTuneConfig) or self.prompt is None:
            return {}
        path = save_prompt_adapter(
            self.prompt, run_dir / "adapter", self.pre.model.config, task_type, base,
            self.task.init, self.task.init_text, score,
        )  # fmt: skip
        return {"adapter": str(path)}


class LMHead(Head):
    """PubMedQA fine-tuning or soft prompting of the causal LM."""

    def __init__(self, task: FinetuneConfig, pre: Restored, seq_len: int, prompt: SoftPrompt | None) -> None:
        super().__init__(task, pre, seq_len, prompt)
        self.splits = {
            s: stratified_sample(
                load_pubmedqa(task.data_dir, s), task.limit, lambda e: e.label, f"PubMedQA {s} examples"
            )
            for s in ("train", "dev", "test")
        }
        self.train = [
            encode_answer(pre.tokenizer, pubmedqa_prompt(e, task.with_long_answer), e.label, seq_len)
            for e in self.splits["train"]
        ]
        self.train_size = len(self.train)
        self.pad = (self.pad_id, IGNORE)
        self.model = PromptedLM(pre.model, prompt) if prompt is not None else pre.model

    def example(self, i: int) -> tuple[Sequence[int], torch.Tensor]:
        """Training example `i`: input ids (T) and next-token targets (T), IGNORE except at the answer."""
        return self.train[i].ids, torch.tensor(self.train[i].targets)

    def loss(self, forward: Forward, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the answer tokens of a (B, T) micro-batch."""
        return forward(inputs, targets)[1]

    @torch.no_grad()
    def _scores(self, split: str, device: torch.device) -> dict[str, float]:
        self.model.eval()
        examples = self.splits[split]
        scores = choice_loglikelihoods(
            lambda ids, mask: self.model(ids)[0],
            self.pre.tokenizer,
            [pubmedqa_prompt(e, self.task.with_long_answer) for e in examples],
            CHOICES,
            batch_size=self.task.eval_batch_size,
            progress=False,
            max_length=self.seq_len,
            device=device,
        )
        predicted = scores.argmax(-1).tolist()
        gold = [e.label_index for e in examples]
        accuracy = sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
        return {"accuracy": accuracy, "macro_f1": macro_f1(gold, predicted)}

    def dev(self, device: torch.device) -> tuple[float, dict[str, float]]:
        """(selection score, metrics) on fold-0 dev: accuracy."""
        metrics = self._scores("dev", device)
        return metrics["accuracy"], metrics

    def test(self, device: torch.device) -> dict[str, float]:
        return self._scores("test", device)

    def export(self, run_dir: Path, info: dict) -> dict[str, str]:
        hf = export_hf(self.pre.model, run_dir / "hf", self.pre.tokenizer, info)
        return {"hf": str(hf), **self._adapter(run_dir, hf, "causal_lm", None)}


class HoCHead(Head):
    """HoC multi-label classification: a head (and optionally a soft prompt) on the last non-pad token."""

    def __init__(self, task: FinetuneConfig, pre: Restored, seq_len: int, prompt: SoftPrompt | None) -> None:
        super().__init__(task, pre, seq_len, prompt)
        self.splits = {
            s: stratified_sample(
                load_hoc(task.data_dir, s), task.limit, lambda e: tuple(sorted(e.labels)), f"HoC {s} abstracts"
            )
            for s in ("train", "dev", "test")
        }
        self.inputs = {s: [encode_text(pre.tokenizer, e.text, seq_len) for e in ex] for s, ex in self.splits.items()}
        self.targets = torch.stack([e.label_vector() for e in self.splits["train"]])
        self.train_size = len(self.splits["train"])
        self.pad = (self.pad_id, 0.0)  # label vectors are never padded: they have one length
        self.model = Classifier(pre.model, len(HALLMARKS), self.pad_id, prompt)

    def _logits(self, split: str, batch: list[int] | range, device: torch.device) -> torch.Tensor:
        return self.model(pad([self.inputs[split][i] for i in batch], self.pad_id).to(device))

    def example(self, i: int) -> tuple[Sequence[int], torch.Tensor]:
        """Training document `i`: its first `seq_len` token ids and its 10 hallmark labels (0/1 floats)."""
        return self.inputs["train"][i], self.targets[i]

    def loss(self, forward: Forward, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """BCE of the 10 hallmark logits of a (B, T) micro-batch against its (B, 10) labels."""
        return F.binary_cross_entropy_with_logits(forward(inputs).float(), targets)

    @torch.no_grad()
    def probabilities(self, split: str, device: torch.device) -> torch.Tensor:
        """(documents, 10) sigmoid probabilities of `split`."""
        self.model.eval()
        n, size = len(self.inputs[split]), self.task.eval_batch_size
        rows = [self._logits(split, range(i, min(n, i + size)), device) for i in range(0, n, size)]
        return torch.sigmoid(torch.cat(rows).float()).cpu()

    def dev(self, device: torch.device) -> tuple[float, dict[str, float]]:
        """(selection score, metrics) on dev: the BLURB F1 at the best threshold."""
        probs, dev = self.probabilities("dev", device), self.splits["dev"]
        result = evaluate_hoc(probs, dev, probs, dev)
        return result.dev_f1, {"f1": result.dev_f1, "threshold": result.threshold}

    def test(self, device: torch.device) -> dict[str, float]:
        """BLURB F1 (pooled micro) and the per-hallmark macro F1 on test at the threshold chosen on dev."""
        result = evaluate_hoc(
            self.probabilities("dev", device),
            self.splits["dev"],
            self.probabilities("test", device),
            self.splits["test"],
        )
        return {"f1": result.test_f1, "macro_f1": result.test_macro_f1, "threshold": result.threshold}

    def export(self, run_dir: Path, info: dict) -> dict[str, str]:
        hf = export_seq_cls(self.model, run_dir / "hf", list(HALLMARKS), self.pre.tokenizer, info=info)
        return {"hf": str(hf), **self._adapter(run_dir, hf, "seq_cls", self.model.score.weight)}

"""Sequence classification with a causal LM of any family: a linear head on the hidden state of the last non-pad token.

The network of `transformers.GPT2ForSequenceClassification` and `LlamaForSequenceClassification`: `score` is a
bias-free (num_labels, C) linear layer and the pooled position is the rightmost token that is not `pad_token_id`
(inputs are right-padded; the causal attention keeps real tokens from seeing the padding). A soft prompt, if given,
goes in front.
"""

from __future__ import annotations

import torch
from torch import nn

from modelzoo.models.registry import CausalLM
from modelzoo.models.soft_prompt import SoftPrompt


class Classifier(nn.Module):
    """`forward(idx)` returns logits (B, num_labels) of `idx` (B, T) right-padded with `pad_token_id`."""

    def __init__(
        self, backbone: CausalLM, num_labels: int, pad_token_id: int, prompt: SoftPrompt | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        self.score = nn.Linear(backbone.config.n_embd, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=backbone.config.init_std)
        self.prompt = prompt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        prefix = self.prompt(B) if self.prompt is not None else None
        h = self.backbone.hidden(idx, prefix=prefix)  # (B, P + T, C)
        # HF's rule: the rightmost position whose token is not padding (position 0 if all are).
        positions = torch.arange(T, device=idx.device)
        last = (positions * (idx != self.pad_token_id)).argmax(-1) + h.shape[1] - T  # (B,)
        return self.score(h[torch.arange(B, device=idx.device), last])  # (B, num_labels)

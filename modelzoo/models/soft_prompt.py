"""Soft prompting (Lester et al. 2021, as PEFT's `PROMPT_TUNING`): N trainable virtual-token embeddings.

The prompt is a plug-in applied from outside: `GPT.hidden(idx, prefix=prompt(B))` puts the N embeddings in
front of the token embeddings (positions 0..N-1, as PEFT does with HF GPT-2); the backbone is frozen by
`freeze`, so only the prompt (and a task head, if any) trains.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelzoo.models.registry import CausalLM

PROMPT_INITS = ("vocab", "text")


class SoftPrompt(nn.Module):
    """`num_virtual_tokens` embeddings of width `n_embd`; `forward(B)` gives them as a (B, N, C) prefix."""

    def __init__(self, num_virtual_tokens: int, n_embd: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_virtual_tokens, n_embd))

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    @torch.no_grad()
    def init_from_vocab(self, wte: torch.Tensor, generator: torch.Generator) -> None:
        """Copy the embeddings of N vocabulary tokens drawn uniformly at random (PEFT's `SAMPLE_VOCAB`)."""
        ids = torch.randint(wte.shape[0], (self.num_virtual_tokens,), generator=generator)
        self.embedding.copy_(wte[ids.to(wte.device)])

    @torch.no_grad()
    def init_from_text(self, wte: torch.Tensor, token_ids: list[int]) -> None:
        """Copy the embeddings of the text's tokens, repeated or cut to N (PEFT's `TEXT` init)."""
        if not token_ids:
            raise ValueError("the soft-prompt init text has no tokens")
        n = self.num_virtual_tokens
        ids = (token_ids * math.ceil(n / len(token_ids)))[:n]
        self.embedding.copy_(wte[torch.tensor(ids, device=wte.device)])

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.unsqueeze(0).expand(batch_size, -1, -1)  # (B, N, C)


def freeze(module: nn.Module) -> None:
    """Stop gradients to every parameter of `module` (the backbone under a soft prompt)."""
    for p in module.parameters():
        p.requires_grad_(False)


class PromptedLM(nn.Module):
    """A causal LM behind a soft prompt: `forward(idx, targets)` as `GPT.forward`, on the real positions only."""

    def __init__(self, backbone: CausalLM, prompt: SoftPrompt) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.prompt.num_virtual_tokens
        logits, _ = self.backbone(idx, prefix=self.prompt(idx.shape[0]))
        logits = logits[:, n:]  # (B, T, vocab): the virtual positions predict nothing we score
        if targets is None:
            return logits, None
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

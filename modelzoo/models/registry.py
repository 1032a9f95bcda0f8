"""The model families and the one small interface the rest of the zoo uses instead of a family's specifics.

A family is a config dataclass (whose `family` field names it) and a plain `nn.Module`. Both families' configs
share the shape fields of `ModelConfig`; their modules satisfy `CausalLM`. Everything outside the model files
and their rename tables (HF export, Cerebras conversion) works through these two, never through a family's
module names.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from modelzoo.errors import ConfigError
from modelzoo.models.common import KVCache
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.models.llama import Llama, LlamaConfig


class ModelConfig(Protocol):
    """The shape fields every family's config has (HF GPT-2's names)."""

    name: str
    family: str
    n_layer: int
    n_embd: int
    n_head: int
    n_inner: int
    n_positions: int
    vocab_size: int
    padded_vocab_multiple: int

    @property
    def n_kv_head(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def padded_vocab_size(self) -> int: ...


class CausalLM(Protocol):
    """What the loop, sparsity, inference, FLOPs, memory and export need from a model."""

    VOCAB_ROWS: ClassVar[tuple[str, ...]]  # tensors with one row per token id (the embedding, an untied head)
    EMBEDDINGS: ClassVar[tuple[str, ...]]  # what `num_params(non_embedding=True)` leaves out
    config: Any  # a `ModelConfig`

    @property
    def blocks(self) -> nn.ModuleList: ...  # the transformer blocks, in order

    @property
    def embedding(self) -> nn.Embedding: ...  # the token embedding

    def new_cache(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> KVCache: ...

    def hidden(
        self, idx: torch.Tensor, cache: KVCache | None = None, prefix: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def __call__(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def num_params(self, non_embedding: bool = True) -> int: ...

    @staticmethod
    def block_activation_bytes(config: Any, precision: str, weights: str = "fp32") -> int: ...  # per token

    @staticmethod
    def final_norm_bytes(config: Any, weights: str = "fp32") -> int: ...  # per token, kept by the final norm


# family -> (config schema, module)
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {"gpt": (GPTConfig, GPT), "llama": (LlamaConfig, Llama)}


def config_class(family: str, key: str = "model.family") -> type:
    """The config dataclass of `family`; an unknown family is a `ConfigError` naming `key`."""
    if family not in FAMILIES:
        raise ConfigError(key, f"unknown model family {family!r}", sorted(FAMILIES))
    return FAMILIES[family][0]


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The module class that builds `config`."""
    config_class(config.family)
    return FAMILIES[config.family][1]


def build_model(config: ModelConfig) -> CausalLM:
    """A freshly initialised model of `config`'s family and shape."""
    return model_class(config)(config)


def unpad_vocab(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`state_dict` with the padded vocabulary rows (beyond `config.vocab_size`) cut off, for exports.

    A plug-in's tensors stored beside a vocabulary tensor under a longer name (its `<param>_mask`) are cut too.
    """
    rows = model_class(config).VOCAB_ROWS
    return {k: v[: config.vocab_size] if k.startswith(rows) else v for k, v in state_dict.items()}


def pad_vocab(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`state_dict` of `config.vocab_size` rows with zero rows appended up to `config.padded_vocab_size`."""
    rows, extra = model_class(config).VOCAB_ROWS, config.padded_vocab_size - config.vocab_size
    return {
        k: torch.cat([v, v.new_zeros(extra, *v.shape[1:])]) if k.startswith(rows) else v for k, v in state_dict.items()
    }

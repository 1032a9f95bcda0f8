"""Export a `Classifier` as its family's HF sequence classifier (`GPT2ForSequenceClassification`,
`LlamaForSequenceClassification`), multi-label or single-label.

The backbone converts with the causal-LM table of `modelzoo.export.hf` (masks baked in, the family's renames), less
the LM head a sequence classifier has none of; the head is `score.weight` unchanged. `pad_token_id` is set, which HF
needs to find the last non-pad token of a batch.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modelzoo.errors import CheckpointError
from modelzoo.export.hf import TABLES, TIED_KEY, save_hf_directory, sparsity_report, to_hf_config, to_hf_state_dict
from modelzoo.models.classifier import Classifier
from modelzoo.sparsity.masks import MASK_SUFFIX

PROBLEM_TYPES = ("multi_label_classification", "single_label_classification")


def to_hf_seq_cls(
    classifier: Classifier,
    labels: list[str],
    problem_type: str = "multi_label_classification",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """The HF sequence classifier of the backbone's family computing the same logits as `classifier` (eval mode)."""
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type={problem_type!r}; allowed: {', '.join(PROBLEM_TYPES)}")
    if len(labels) != classifier.num_labels:
        raise ValueError(f"{len(labels)} label names for a head of {classifier.num_labels} outputs")
    bos, eos = (tokenizer.bos_token_id, tokenizer.eos_token_id) if tokenizer is not None else (None, None)
    config = to_hf_config(classifier.backbone.config, bos, eos)
    config.num_labels = classifier.num_labels
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.problem_type = problem_type
    config.pad_token_id = classifier.pad_token_id
    state = {
        k: v
        for k, v in to_hf_state_dict(classifier.backbone.state_dict(), classifier.backbone.config).items()
        if k != TIED_KEY
    }
    state["score.weight"] = classifier.score.weight.detach()
    hf_class = TABLES[classifier.backbone.config.family].HF_SEQ_CLS
    hf_model = hf_class(config).to(classifier.score.weight.dtype)
    result = hf_model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"state dict does not match {hf_class.__name__}: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return hf_model.eval()


def export_seq_cls(
    classifier: Classifier,
    output_dir: str | os.PathLike,
    labels: list[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    problem_type: str = "multi_label_classification",
    info: dict | None = None,
) -> Path:
    """Write `classifier` as a safetensors HF sequence-classifier directory plus `sparsity.json`."""
    hf_model = to_hf_seq_cls(classifier, labels, problem_type, tokenizer)
    backbone_state = classifier.backbone.state_dict()
    masked = [k.removesuffix(MASK_SUFFIX) for k in backbone_state if k.endswith(MASK_SUFFIX)]
    report = sparsity_report(to_hf_state_dict(backbone_state, classifier.backbone.config), masked, info)
    return save_hf_directory(hf_model, output_dir, tokenizer, report)

"""Structured config of `task=evaluate` (registered in the ConfigStore by `modelzoo.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvaluateConfig:
    """Evaluate `checkpoints` (run or checkpoint directories) and `hf_dirs` (local Hugging Face causal LMs).

    With neither, the latest checkpoint of `run_dir`. `split` "test" is the official 500 questions;
    `with_long_answer` false is the reasoning-required setting. `limit` scores N questions (0: all), a sample
    stratified by label and drawn with a fixed seed (the test file is sorted by label: 276 yes, then 169 no, then 55
    maybe, so its first N would all be "yes"); `limit_first` takes the first N instead, as lm-eval's `--limit`
    does, for the parity check against it. Results (results.md, results.json, predictions/,
    accuracy_vs_flops.png) go to `output_dir`.
    """

    name: str = "evaluate"
    checkpoints: list[str] = field(default_factory=list)
    hf_dirs: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: ["pubmedqa"])
    pubmedqa_data: str = "../shared/data/pubmedqa"
    split: str = "test"
    with_long_answer: bool = False
    limit: int = 0
    limit_first: bool = False
    batch_size: int = 8
    output_dir: str = "runs/evaluate"
    device: str = "auto"
    precision: str = "fp32"
    converter: str = "none"  # the inference converter (modelzoo.backends.converters): none | torch_sparse
    progress: bool = True

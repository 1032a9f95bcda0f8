"""Calibration sequences for one-shot pruning: random packed blocks of the pre-training corpus's training split.

SparseGPT and Wanda calibrate on 128 random sequences of the pre-training distribution (C4 in both papers);
here they are `calibration_samples` packed blocks of `data.seq_len` tokens of the `data` corpus, drawn without
replacement with the run's seed.
"""

from __future__ import annotations

import numpy as np
import torch

from modelzoo.errors import ConfigError


def calibration_tokens(blocks: np.ndarray, samples: int, seed: int, source: str) -> torch.Tensor:
    """`samples` random blocks of `blocks` (num_blocks, seq_len + 1) as input ids, (samples, seq_len) int64.

    Raises:
        ConfigError: the corpus has fewer blocks than `samples` (`task.calibration_samples`).
    """
    if len(blocks) < samples:
        raise ConfigError(
            "task.calibration_samples",
            f"{source} gives {len(blocks)} blocks of data.seq_len + 1 = {blocks.shape[1]} tokens, fewer than the "
            f"{samples} requested; lower task.calibration_samples or data.seq_len, or add documents",
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:samples]
    chosen = np.asarray(blocks[np.sort(order.numpy())], dtype=np.int64)
    return torch.from_numpy(chosen[:, :-1]).contiguous()

"""One-shot pruning of dense causal LMs: SparseGPT, Wanda and magnitude, block by block on calibration data."""

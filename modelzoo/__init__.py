"""Sparse pre-training of GPT-style biomedical language models, portable across Cerebras, CPU and GPU."""

__version__ = "0.1.0"

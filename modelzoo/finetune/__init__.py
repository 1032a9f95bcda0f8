"""Downstream adaptation of a pre-trained checkpoint: dense or sparse fine-tuning and soft prompting."""

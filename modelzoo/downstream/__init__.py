"""Downstream tasks of the MediSwift recipe: PubMedQA and HoC data, prompts, scoring and metrics."""

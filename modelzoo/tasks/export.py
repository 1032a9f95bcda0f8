"""`modelzoo export`: a run's checkpoint as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from modelzoo.checkpoint import resolve_checkpoint
from modelzoo.config import ExportConfig
from modelzoo.export.hf import export_hf
from modelzoo.restore import restore_model
from modelzoo.validate import validated_config


def main(overrides: list[str]) -> None:
    cfg = validated_config(overrides, "export")
    task: ExportConfig = cfg.task
    path = resolve_checkpoint(task.checkpoint, cfg.run_dir)
    run = restore_model(path)
    output = Path(task.output_dir) if task.output_dir else path.parent.parent / "hf"
    info = {**(run.config.sparsity.summary() if run.config.sparsity.enabled else {}), "checkpoint": str(path)}
    print(f"exported {path} -> {export_hf(run.model, output, run.tokenizer, info)}")

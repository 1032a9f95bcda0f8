"""`modelzoo import-cerebras` and `modelzoo export-cerebras`: Cerebras Model Zoo params and checkpoints in and out."""

from __future__ import annotations

from pathlib import Path

from modelzoo.backends.cerebras.checkpoint import export_cerebras, import_cerebras
from modelzoo.backends.cerebras.params import read_params, write_hydra_options
from modelzoo.checkpoint import resolve_checkpoint
from modelzoo.errors import ModelZooError
from modelzoo.validate import validated_config


def import_main(args: list[str]) -> None:
    """`PARAMS.yaml OUT_DIR [CHECKPOINT]`: the params as our config options, the checkpoint as OUT_DIR's step 0."""
    if len(args) not in (2, 3) or any("=" in a for a in args):
        raise ModelZooError("usage: modelzoo import-cerebras PARAMS.yaml OUT_DIR [CHECKPOINT]")
    params, out_dir = args[0], Path(args[1])
    overrides = write_hydra_options(read_params(params), out_dir / "conf")
    print(f"wrote the config options of {params} to {out_dir / 'conf'}; train with them:")
    print("  modelzoo pretrain " + " ".join(overrides))
    if len(args) == 3:
        path = import_cerebras(params, args[2], out_dir)
        print(f"imported {args[2]} -> {path}; then: modelzoo export run_dir={out_dir}")


def export_main(overrides: list[str]) -> None:
    """A run's checkpoint as a Cerebras Model Zoo `params.yaml` and `model.mdl` (`task.output_dir`)."""
    cfg = validated_config(overrides, "export")
    path = resolve_checkpoint(cfg.task.checkpoint, cfg.run_dir)
    output = Path(cfg.task.output_dir) if cfg.task.output_dir else path.parent.parent / "cerebras"
    params, weights = export_cerebras(path, output)
    print(f"exported {path} -> {params}, {weights}")

"""What fits per GPU under FSDP2: the table in docs/gpu.md, from `modelzoo.memory` (what `modelzoo info` prints).

    python scripts/fsdp_memory_table.py            # print the markdown table
    python scripts/fsdp_memory_table.py --check    # exit 1 unless docs/gpu.md holds exactly this table

Each row is `modelzoo info model=M sparsity=S task.parallelism=fsdp task.precision=bf16 --gpus=8` at the row's
micro-batch (gradient accumulation adds nothing: the loop reduce-scatters every micro-batch); the last column is what
one DDP replica needs instead (`task.parallelism=ddp`, no activation checkpointing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelzoo.config import load_config, to_object
from modelzoo.memory import GIB, memory_plan

DOC = Path(__file__).resolve().parent.parent / "docs" / "gpu.md"
GPUS = 8
PRECISION = "bf16"
# model -> (micro-batch, seq_len): 4,096 tokens per GPU per micro-batch each
SHAPES = {"llama2_7b": (1, 4096), "llama3_8b": (1, 4096), "xl": (2, 2048)}
SPARSITIES = ("dense", "static_75")
# Card memory in GB (1e9 bytes); a plan fits when it is at most 90% of it, leaving room for what the plan leaves out
# (the CUDA context, cuBLAS and NCCL workspaces, allocator fragmentation, transient backward buffers).
CARDS_GB = (80, 24)
HEADROOM = 0.9


def fits(total: int, checkpointed: int, card_gb: int) -> str:
    """`yes`, `with AC` (activation checkpointing) or `no`, for a card of `card_gb` GB."""
    usable = HEADROOM * card_gb * 1e9
    return "yes" if total <= usable else "with AC" if checkpointed <= usable else "no"


def table() -> str:
    """The markdown table of every model and sparsity in `SHAPES` and `SPARSITIES`, per GPU of `GPUS`."""
    header = [
        "model",
        "sparsity",
        "micro-batch",
        "GiB per GPU",
        "with activation checkpointing",
        *(f"fits {GPUS} x {gb} GB" for gb in CARDS_GB),
        "one DDP replica, GiB",
    ]
    rows = [header, ["---"] * len(header)]
    for model, (micro, seq) in SHAPES.items():
        for sparsity in SPARSITIES:
            cfg = to_object(load_config([f"model={model}", f"sparsity={sparsity}", f"data.seq_len={seq}"]))
            plan = memory_plan(cfg.model, cfg.sparsity, PRECISION, micro, seq, fsdp_gpus=GPUS)
            replica = memory_plan(cfg.model, cfg.sparsity, PRECISION, micro, seq)
            rows.append(
                [
                    model,
                    sparsity,
                    f"{micro} x {seq}",
                    f"{plan.total / GIB:.1f}",
                    f"{plan.total_checkpointed / GIB:.1f}",
                    *(fits(plan.total, plan.total_checkpointed, gb) for gb in CARDS_GB),
                    f"{replica.total / GIB:.1f}",
                ]
            )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 unless {DOC.name} holds this table")
    args = parser.parse_args(argv)
    text = table()
    if not args.check:
        print(text)
        return 0
    if text in DOC.read_text():
        return 0
    print(f"{DOC} does not hold the table this script prints now; paste its output there:\n{text}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

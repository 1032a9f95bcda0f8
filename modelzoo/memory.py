"""Device memory one data-parallel replica needs to train a model, from the config alone (`modelzoo info`).

Exact for what scales with the parameters: fp32 weights, fp32 gradients, DDP's fp32 gradient buckets (torchrun runs;
`gradient_as_bucket_view` is off), AdamW's two fp32 moments, and the sparsity plug-in's bool masks (its hooks select
with them, keeping no float copy; RigL also keeps a dense fp32 gradient of each sparse weight during the steps that
update masks). Under bf16 autocast the forward casts each weight matrix to bf16 once per micro-batch, and
those copies live until the backward pass has used them.

Activations are what autograd keeps per token for the backward pass, counted tensor by tensor for each family's block
with a fused SDPA kernel (flash / memory-efficient on CUDA, flash on CPU: no T x T scores are kept), dropout 0 (the
GPT-3 sizes), activations of 2 bytes (bf16) or 4 (fp32) and the fp32 residual stream. The per-block table and the
final norm's bytes belong to the model file (`GPT.block_activation_bytes`, `Llama.block_activation_bytes`,
`final_norm_bytes`), which the registry's `model_class` gives; this module adds, once: the token ids and targets
(int64, 16), the final norm, the LM head's input a*h, and the logits: the head's output over the padded vocabulary
(a * V_pad, held by the step until its backward) and the fp32 log-softmax the loss keeps (4 V). With activation
checkpointing a block keeps only its fp32 input (4h per token); the backward pass recomputes one block at a time, so
one block's full activations are live on top. tests/test_memory.py checks these counts against what autograd saves on
CPU. Not counted: the CUDA context and cuBLAS workspaces (a few hundred MiB), allocator fragmentation, and the
transient buffers of the backward pass (the logits' gradient is as large as the logits). With distillation
(`task.distill.teacher`) the teacher adds its fp32 weights (frozen: no gradients, no optimizer state) and per token,
while the loss waits for the backward pass: its logits (a * V_pad) and fp32 log-probabilities (4 V), the student's
tempered fp32 log-softmax (4 V) and, for the hidden term, each block's fp32 teacher output and student-minus-teacher
difference (8h per layer); the teacher's forward keeps nothing else (no_grad).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelzoo.models.common import activation_bytes
from modelzoo.models.registry import ModelConfig, build_model, model_class
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plan import plan_groups

GIB = 2**30
FP32 = 4


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes by item, for one replica at `micro_batch_size` x `seq_len` tokens per micro-batch."""

    model: str
    precision: str
    micro_batch_size: int
    seq_len: int
    items: tuple[tuple[str, int], ...]  # state that does not depend on checkpointing
    activations: int
    activations_checkpointed: int

    @property
    def state(self) -> int:
        return sum(b for _, b in self.items)

    @property
    def total(self) -> int:
        return self.state + self.activations

    @property
    def total_checkpointed(self) -> int:
        return self.state + self.activations_checkpointed


def block_activation_bytes(config: ModelConfig, precision: str) -> int:
    """Bytes one block keeps per token for the backward pass (the family's table, in its model file)."""
    return model_class(config).block_activation_bytes(config, precision)


def head_activation_bytes(config: ModelConfig, precision: str) -> int:
    """Bytes per token kept outside the blocks: ids and targets, final norm and LM-head inputs, logits, fp32
    log-softmax."""
    a = activation_bytes(precision)
    ids = 2 * 8
    norm = model_class(config).final_norm_bytes(config)
    return ids + norm + a * config.n_embd + a * config.padded_vocab_size + FP32 * config.vocab_size


def memory_plan(
    config: ModelConfig,
    sparsity: SparsityConfig | None,
    precision: str,
    micro_batch_size: int,
    seq_len: int,
    teacher: ModelConfig | None = None,
    teacher_hidden: bool = False,
) -> MemoryPlan:
    """What one DDP replica holds at the peak of a training step (the start of the backward pass); `teacher`: the
    config of a distillation teacher, `teacher_hidden`: with the hidden-state term."""
    with torch.device("meta"):
        model = build_model(config)
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in params.values())
    enabled = sparsity is not None and sparsity.enabled
    sparse = [name for plan in plan_groups(sparsity, model) for name in plan.names] if enabled else []
    n_sparse = sum(params[name].numel() for name in sparse)
    items = [
        ("weights (fp32)", FP32 * n),
        ("gradients (fp32)", FP32 * n),
        ("DDP gradient buckets (fp32, torchrun only)", FP32 * n),
        ("AdamW moments (2 x fp32)", 2 * FP32 * n),
    ]
    if enabled:
        items.append(("sparsity masks (bool)", n_sparse))
        if "rigl" in sparsity.algorithms:
            items.append(("RigL dense gradients (mask-update steps)", FP32 * n_sparse))
    tokens = micro_batch_size * seq_len
    if teacher is not None:
        with torch.device("meta"):
            n_teacher = build_model(teacher).num_params(non_embedding=False)
        a = activation_bytes(precision)
        per_token = a * teacher.padded_vocab_size + 2 * FP32 * config.vocab_size
        per_token += 2 * FP32 * config.n_embd * config.n_layer if teacher_hidden else 0
        items.append(("distillation teacher weights (fp32, frozen)", FP32 * n_teacher))
        items.append(("distillation: teacher outputs kept for the loss", per_token * tokens))
    # bf16 autocast: a copy of every weight matrix the forward multiplies by (the block matrices and the LM head),
    # cached until the forward leaves autocast and kept by autograd until the backward has used it. With
    # checkpointing too: the cache holds them all at the end of the forward.
    matrices = sum(p.numel() for p in model.blocks.parameters() if p.ndim == 2)
    copies = 2 * (matrices + config.padded_vocab_size * config.n_embd) if precision == "bf16" else 0
    block = block_activation_bytes(config, precision) * tokens
    head = head_activation_bytes(config, precision) * tokens
    activations = config.n_layer * block + head + copies
    checkpointed = config.n_layer * FP32 * config.n_embd * tokens + block + head + copies
    return MemoryPlan(config.name, precision, micro_batch_size, seq_len, tuple(items), activations, checkpointed)


def format_memory_plan(plan: MemoryPlan) -> str:
    """The plan as a table in GiB, with and without activation checkpointing."""
    lines = [
        f"training memory of one DDP replica: model {plan.model}, micro-batch {plan.micro_batch_size} x "
        f"{plan.seq_len} tokens, {plan.precision} (estimate; modelzoo/memory.py says what is counted)",
        *(f"  {name:<52}{b / GIB:>9.2f} GiB" for name, b in plan.items),
        f"  {'activations, bf16 weight copies, logits':<52}{plan.activations / GIB:>9.2f} GiB",
        f"  {'  with task.activation_checkpointing=true':<52}{plan.activations_checkpointed / GIB:>9.2f} GiB",
        f"  {'total':<52}{plan.total / GIB:>9.2f} GiB",
        f"  {'  with task.activation_checkpointing=true':<52}{plan.total_checkpointed / GIB:>9.2f} GiB",
    ]
    return "\n".join(lines)

"""Device memory a GPU needs to train a model, from the config alone (`modelzoo info`): one DDP replica, or one GPU of
an FSDP2 job (`task.parallelism=fsdp`) over N GPUs.

DDP: exact for what scales with the parameters: fp32 weights, fp32 gradients, DDP's fp32 gradient buckets (torchrun
runs; `gradient_as_bucket_view` is off), AdamW's two fp32 moments, and the sparsity plug-in's bool masks (its hooks
select with them, keeping no float copy; RigL also keeps a dense fp32 gradient of each sparse weight during the steps
that update masks). Under bf16 autocast the forward casts each weight matrix to bf16 once per micro-batch, and those
copies live until the backward pass has used them.

FSDP2 as `modelzoo.train.parallel` applies it (`fully_shard` on each block, then on the root with
`reshard_after_forward=False`; `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` under bf16, fp32 weights
otherwise), at the start of the backward pass: the fp32 weights, gradients and AdamW moments / N, and the bool masks / N
(the loop shards each mask with its weight's rows: `FSDP_MASKS`); the root module's parameters (embeddings, final norm,
LM head), gathered in the param dtype for the whole step (FSDP2's own default for a root, torch's `fully_shard` docs),
and their unsharded gradients, reduce-scattered only when the backward ends; two blocks' all-gathered parameters (the
block in compute and the one prefetched, forward and backward; a block's are freed when its forward or backward ends);
one block's unsharded gradients as autograd makes them (param dtype) and the reduce-scatter's input of one block (fp32,
the reduce dtype), which the loop reduce-scatters on every micro-batch, so gradient accumulation keeps only sharded
gradients. RigL's dense gradient is of the sharded weight (/ N); its mask update, after the optimizer step (not at the
peak), gathers one whole weight, mask and dense gradient at a time. With bf16 weights the forward needs no autocast
copies, and the embeddings' output, so the residual stream, is bf16 (`block_activation_bytes(..., weights="bf16")`).

Activations are what autograd keeps per token for the backward pass, counted tensor by tensor for each family's block
with a fused SDPA kernel (flash / memory-efficient on CUDA, flash on CPU: no T x T scores are kept), dropout 0 (the
GPT-3 sizes), activations of 2 bytes (bf16) or 4 (fp32) and the residual stream in the weights' dtype. They are per
GPU, the same under DDP and FSDP (up to that dtype). The per-block table and the final norm's bytes belong to the
model file (`GPT.block_activation_bytes`, `Llama.block_activation_bytes`, `final_norm_bytes`), which the registry's
`model_class` gives; this module adds, once: the token ids and targets (int64, 16), the final norm, the LM head's input
a*h, and the logits: the head's output over the padded vocabulary (a * V_pad, held by the step until its backward) and
the fp32 log-softmax the loss keeps (4 V). With activation checkpointing a block keeps only its input (r*h per token,
r the residual stream's bytes); the backward pass recomputes one block at a time, so one block's full activations are
live on top. tests/test_memory.py checks these counts against what autograd saves on CPU, under DDP and under
`fully_shard`. Not counted: the CUDA context and cuBLAS workspaces (a few hundred MiB), allocator fragmentation, NCCL's
buffers, and the transient buffers of the backward pass (the logits' gradient is as large as the logits). With
distillation (`task.distill.teacher`) the teacher adds its fp32 weights, whole on every GPU (frozen: no gradients, no
optimizer state) and per token, while the loss waits for the backward pass: its logits (a * V_pad) and fp32
log-probabilities (4 V), the student's tempered fp32 log-softmax (4 V) and, for the hidden term, each block's fp32
teacher output and student-minus-teacher difference (8h per layer); the teacher's forward keeps nothing else
(no_grad).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelzoo.models.common import activation_bytes
from modelzoo.models.registry import CausalLM, ModelConfig, build_model, model_class
from modelzoo.sparsity.config import SparsityConfig
from modelzoo.sparsity.plan import plan_groups

GIB = 2**30
FP32 = 4
DDP_BUCKETS = "DDP gradient buckets (fp32, torchrun only)"
# Under FSDP2 the loop shards each mask with its weight's rows (`fully_shard` itself leaves buffers whole).
FSDP_MASKS = "sparsity masks (bool, sharded like their weights)"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes by item, for one GPU at `micro_batch_size` x `seq_len` tokens per micro-batch: a DDP replica
    (`fsdp_gpus` None) or one of `fsdp_gpus` GPUs sharding the model with FSDP2."""

    model: str
    precision: str
    micro_batch_size: int
    seq_len: int
    items: tuple[tuple[str, int], ...]  # state that does not depend on checkpointing
    activations: int
    activations_checkpointed: int
    fsdp_gpus: int | None = None

    @property
    def state(self) -> int:
        return sum(b for _, b in self.items)

    @property
    def total(self) -> int:
        return self.state + self.activations

    @property
    def total_checkpointed(self) -> int:
        return self.state + self.activations_checkpointed


def block_activation_bytes(config: ModelConfig, precision: str, weights: str = "fp32") -> int:
    """Bytes one block keeps per token for the backward pass (the family's table, in its model file); `weights`: the
    dtype the forward's weights have (bf16 under FSDP2's bf16 `param_dtype`)."""
    return model_class(config).block_activation_bytes(config, precision, weights)


def head_activation_bytes(config: ModelConfig, precision: str, weights: str = "fp32") -> int:
    """Bytes per token kept outside the blocks: ids and targets, final norm and LM-head inputs, logits, fp32
    log-softmax."""
    a = activation_bytes(precision)
    ids = 2 * 8
    norm = model_class(config).final_norm_bytes(config, weights)
    return ids + norm + a * config.n_embd + a * config.padded_vocab_size + FP32 * config.vocab_size


def ddp_state(n: int) -> list[tuple[str, int]]:
    """A DDP replica's parameter state: weights, gradients, DDP's buckets and AdamW's moments, all fp32."""
    return [
        ("weights (fp32)", FP32 * n),
        ("gradients (fp32)", FP32 * n),
        (DDP_BUCKETS, FP32 * n),
        ("AdamW moments (2 x fp32)", 2 * FP32 * n),
    ]


def fsdp_state(model: CausalLM, gpus: int, precision: str) -> list[tuple[str, int]]:
    """One GPU's parameter state under FSDP2 over `gpus`, at the start of the backward pass (module docstring)."""
    n = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    root = n - sum(p.numel() for p in model.blocks.parameters())
    dtype, gathered = ("bf16", 2) if precision == "bf16" else ("fp32", FP32)
    return [
        (f"weights (fp32, 1/{gpus})", FP32 * n // gpus),
        (f"gradients (fp32, 1/{gpus})", FP32 * n // gpus),
        (f"AdamW moments (2 x fp32, 1/{gpus})", 2 * FP32 * n // gpus),
        (f"root params, gathered all step ({dtype})", gathered * root),
        (f"root gradients until the backward ends ({dtype})", gathered * root),
        (f"2 blocks' params all-gathered ({dtype})", 2 * gathered * block),
        (f"1 block's unsharded gradients ({dtype})", gathered * block),
        ("1 block's reduce-scatter input (fp32)", FP32 * block),
    ]


def memory_plan(
    config: ModelConfig,
    sparsity: SparsityConfig | None,
    precision: str,
    micro_batch_size: int,
    seq_len: int,
    teacher: ModelConfig | None = None,
    teacher_hidden: bool = False,
    fsdp_gpus: int | None = None,
) -> MemoryPlan:
    """What one GPU holds at the peak of a training step (the start of the backward pass): a DDP replica, or with
    `fsdp_gpus` one GPU of an FSDP2 job over that many; `teacher`: the config of a distillation teacher,
    `teacher_hidden`: with the hidden-state term."""
    with torch.device("meta"):
        model = build_model(config)
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in params.values())
    items = ddp_state(n) if fsdp_gpus is None else fsdp_state(model, fsdp_gpus, precision)
    if sparsity is not None and sparsity.enabled:
        n_sparse = sum(params[name].numel() for plan in plan_groups(sparsity, model) for name in plan.names)
        items.append(("sparsity masks (bool)", n_sparse) if fsdp_gpus is None else (FSDP_MASKS, n_sparse // fsdp_gpus))
        if "rigl" in sparsity.algorithms:
            shards = "" if fsdp_gpus is None else f", 1/{fsdp_gpus}"
            items.append((f"RigL dense gradients (mask-update steps{shards})", FP32 * n_sparse // (fsdp_gpus or 1)))
    tokens = micro_batch_size * seq_len
    if teacher is not None:
        with torch.device("meta"):
            n_teacher = build_model(teacher).num_params(non_embedding=False)
        a = activation_bytes(precision)
        per_token = a * teacher.padded_vocab_size + 2 * FP32 * config.vocab_size
        per_token += 2 * FP32 * config.n_embd * config.n_layer if teacher_hidden else 0
        items.append(("distillation teacher weights (fp32, frozen)", FP32 * n_teacher))
        items.append(("distillation: teacher outputs kept for the loss", per_token * tokens))
    weights = "bf16" if fsdp_gpus is not None and precision == "bf16" else "fp32"  # FSDP2's param_dtype
    # bf16 autocast of fp32 weights: a copy of every weight matrix the forward multiplies by (the block matrices and
    # the LM head), cached until the forward leaves autocast and kept by autograd until the backward has used it.
    # With checkpointing too: the cache holds them all at the end of the forward. FSDP2's bf16 weights need none.
    matrices = sum(p.numel() for p in model.blocks.parameters() if p.ndim == 2)
    copies = (
        2 * (matrices + config.padded_vocab_size * config.n_embd) if precision == "bf16" and weights == "fp32" else 0
    )
    block = block_activation_bytes(config, precision, weights) * tokens
    head = head_activation_bytes(config, precision, weights) * tokens
    activations = config.n_layer * block + head + copies
    block_input = activation_bytes(weights) * config.n_embd * tokens
    checkpointed = config.n_layer * block_input + block + head + copies
    return MemoryPlan(
        config.name,
        precision,
        micro_batch_size,
        seq_len,
        tuple(items),
        activations,
        checkpointed,
        fsdp_gpus,
    )


def format_memory_plan(plan: MemoryPlan) -> str:
    """The plan as a table in GiB, with and without activation checkpointing."""
    ddp = plan.fsdp_gpus is None
    who = "one DDP replica" if ddp else f"one GPU of {plan.fsdp_gpus} under FSDP2 (task.parallelism=fsdp)"
    activations = "activations, bf16 weight copies, logits" if ddp else "activations, logits"
    lines = [
        f"training memory of {who}: model {plan.model}, micro-batch {plan.micro_batch_size} x "
        f"{plan.seq_len} tokens, {plan.precision} (estimate; modelzoo/memory.py says what is counted)",
        *(f"  {name:<52}{b / GIB:>9.2f} GiB" for name, b in plan.items),
        f"  {activations:<52}{plan.activations / GIB:>9.2f} GiB",
        f"  {'  with task.activation_checkpointing=true':<52}{plan.activations_checkpointed / GIB:>9.2f} GiB",
        f"  {'total':<52}{plan.total / GIB:>9.2f} GiB",
        f"  {'  with task.activation_checkpointing=true':<52}{plan.total_checkpointed / GIB:>9.2f} GiB",
    ]
    return "\n".join(lines)

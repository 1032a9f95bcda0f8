"""The memory plan of `modelzoo info`: its activation counts equal what autograd keeps on CPU, to the byte, for a DDP
replica and under FSDP2 (`fully_shard` in a gloo group of one rank: the same hooks, casts and frees as on N GPUs)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from modelzoo.cli import main
from modelzoo.config import load_config, to_object
from modelzoo.memory import (
    FSDP_MASKS,
    GIB,
    block_activation_bytes,
    format_memory_plan,
    memory_plan,
)
from modelzoo.models.gpt import GPT, GPTConfig
from modelzoo.models.llama import Llama, LlamaConfig
from modelzoo.models.registry import CausalLM, ModelConfig, build_model
from modelzoo.train.accel import checkpoint_blocks

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch < 2.6 (the Cerebras venv's 2.4) has FSDP2 only under a private name
    fully_shard = None

REPO = Path(__file__).resolve().parent.parent
CONFIG = GPTConfig(
    name="t", n_layer=3, n_embd=128, n_head=4, n_inner=512, n_positions=128, vocab_size=1000, padded_vocab_multiple=64
)
LLAMA = LlamaConfig(
    name="t", n_layer=3, n_embd=128, n_head=4, n_kv_head=2, n_inner=352, n_positions=128, vocab_size=1000,
    padded_vocab_multiple=64,
)  # fmt: skip


def kept_bytes(model: CausalLM, precision: str, batch: int, seq: int) -> int:
    """Bytes of the tensors autograd saves in one training forward, as they stand when the forward has ended (FSDP2
    has then freed the blocks' gathered parameters), plus the logits the step holds until its backward; one storage
    counted once. The parameters registered then are left out (the plan counts them as weights; under FSDP2 the
    root's gathered ones are its root item)."""
    kept: list[torch.UntypedStorage] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t.untyped_storage())
        return t

    x, y = torch.randint(0, model.config.vocab_size, (2, batch, seq))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        logits, _ = model(x, y)
    kept.append(logits.untyped_storage())
    params = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    live = {s.data_ptr(): s.nbytes() for s in kept if s.nbytes()}  # freed storages have 0 bytes, no address
    return sum(b for ptr, b in live.items() if ptr not in params)


def local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's tensor on this rank: its shard when FSDP2 has made it a DTensor."""
    return p.to_local() if hasattr(p, "to_local") else p


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activation_counts_equal_what_autograd_keeps(precision: str, checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = GPT(CONFIG).train()
    if checkpointing:
        checkpoint_blocks(model)
    batch, seq = 4, 128
    plan = memory_plan(CONFIG, None, precision, batch, seq)
    expected = plan.activations_checkpointed if checkpointing else plan.activations
    if checkpointing:  # the block the backward pass recomputes is not held during the forward
        expected -= block_activation_bytes(CONFIG, precision) * batch * seq
    if checkpointing and precision == "bf16":  # the blocks' bf16 weight copies sit in autocast's cache, not autograd's
        expected -= 2 * sum(
            p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("transformer.h.")
        )
    # Left out of the plan: the position ids (int64, one row for the batch) and a 4-byte scalar of the loss.
    assert kept_bytes(model, precision, batch, seq) == expected + 8 * seq + 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_llama_activation_counts_equal_what_autograd_keeps(precision: str) -> None:
    torch.manual_seed(0)
    model = Llama(LLAMA).train()
    batch, seq = 4, 128
    expected = memory_plan(LLAMA, None, precision, batch, seq).activations
    # Left out of the plan: the fp32 rotary cos/sin tables (one row per position) and a 4-byte scalar of the loss.
    assert kept_bytes(model, precision, batch, seq) == expected + 2 * 4 * LLAMA.head_dim * seq + 4


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A gloo process group of this process alone, for `fully_shard`."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


NEEDS_FSDP2 = pytest.mark.skipif(
    fully_shard is None, reason="torch.distributed.fsdp.fully_shard is public from torch 2.6 (FSDP2 runs need it)"
)


@NEEDS_FSDP2
@pytest.mark.filterwarnings(
    "ignore:FSDP2-wrapped module"
)  # the root returns the logits' unpadded view: no in-place use
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("config", "checkpointing"), [(CONFIG, False), (CONFIG, True), (LLAMA, False)], ids=["gpt", "gpt-ckpt", "llama"]
)
def test_fsdp_activation_counts_equal_what_autograd_keeps(
    world_of_one: None, config: ModelConfig, checkpointing: bool, precision: str
) -> None:
    """FSDP2 as issue 25 applies it: `fully_shard` per block, then the root; bf16 compute weights (param_dtype) with
    fp32 reduction under bf16, fp32 throughout otherwise. A table that kept the fp32 residual stream, or counted the
    autocast copies, under bf16 weights fails here; so does a plan whose premise about what stays gathered is wrong."""
    torch.manual_seed(0)
    model = build_model(config).train()
    if checkpointing:
        checkpoint_blocks(model)
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    batch, seq = 4, 128
    plan = memory_plan(config, None, precision, batch, seq, fsdp_gpus=1)
    expected = plan.activations
    if checkpointing:  # the block the backward pass recomputes is not held during the forward
        expected = plan.activations_checkpointed - block_activation_bytes(config, precision, precision) * batch * seq
    # Left out of the plan: GPT's position ids (int64, one row for the batch), Llama's rotary cos/sin tables (in the
    # weights' dtype, one row per position), and a 4-byte scalar of the loss.
    extra = 8 * seq if config.family == "gpt" else 2 * dtype.itemsize * config.head_dim * seq
    assert kept_bytes(model, precision, batch, seq) == expected + extra + 4
    # The state items' premise: after the forward every block is resharded (DTensors again), while the root's
    # parameters stay gathered in the param dtype for the backward, as many bytes as the plan's root item.
    in_blocks = {id(p) for p in model.blocks.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    assert all(hasattr(p, "to_local") for p in model.blocks.parameters())
    assert all(not hasattr(p, "to_local") and p.dtype == dtype for p in root)
    gathered = next(b for name, b in plan.items if name.startswith("root params"))
    assert gathered == sum(p.numel() * p.element_size() for p in root)


def test_xl_plan_itemises_state_and_checkpointing_saves_activations() -> None:
    cfg = to_object(load_config(["model=xl", "task.micro_batch_size=8", "data.seq_len=2048", "task.precision=bf16"]))
    plan = memory_plan(cfg.model, cfg.sparsity, "bf16", 8, 2048)
    items = dict(plan.items)
    n = 1_315_819_520  # xl with the vocabulary padded to 50304 rows: 1,208.0M block matrices + norms + embeddings
    assert items["weights (fp32)"] == 4 * n
    assert items["AdamW moments (2 x fp32)"] == 8 * n
    assert plan.activations_checkpointed < plan.activations / 2
    text = format_memory_plan(plan)
    assert "activation_checkpointing" in text and f"{plan.total / GIB:.2f} GiB" in text


def test_fsdp_plan_shards_the_state_and_masks() -> None:
    """LLaMA-2 7B, 75% static, bf16, on 8 GPUs: every fp32 state item and the bool masks are 1/8 of the replica's, and
    what is gathered is the root (embeddings, head, final norm) and whole blocks in bf16."""
    cfg = to_object(load_config(["model=llama2_7b", "sparsity=static_75", "task.parallelism=fsdp"]))
    ddp = dict(memory_plan(cfg.model, cfg.sparsity, "bf16", 1, 4096).items)
    fsdp = memory_plan(cfg.model, cfg.sparsity, "bf16", 1, 4096, fsdp_gpus=8)
    items = dict(fsdp.items)
    n, root, block = 6_738_415_616, 2 * 32000 * 4096 + 4096, 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096  # HF's counts
    assert items["weights (fp32, 1/8)"] == ddp["weights (fp32)"] // 8 == 4 * n // 8
    assert items["AdamW moments (2 x fp32, 1/8)"] == ddp["AdamW moments (2 x fp32)"] // 8
    assert items[FSDP_MASKS] == ddp["sparsity masks (bool)"] // 8
    assert items["root params, gathered all step (bf16)"] == items["root gradients until the backward ends (bf16)"]
    assert items["root params, gathered all step (bf16)"] == 2 * root
    assert items["2 blocks' params all-gathered (bf16)"] == 2 * 2 * block
    assert items["1 block's reduce-scatter input (fp32)"] == 4 * block
    assert not any("DDP" in name for name in items)
    assert fsdp.total < memory_plan(cfg.model, cfg.sparsity, "bf16", 1, 4096, fsdp_gpus=4).total


@NEEDS_FSDP2
def test_info_takes_the_fsdp_gpu_count_as_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    main(["info", "model=tiny", "backend=masked_dense", "task.parallelism=fsdp", "--gpus=4"])
    assert "training memory of one GPU of 4 under FSDP2" in capsys.readouterr().out
    main(["info", "model=tiny", "backend=masked_dense", "task.parallelism=fsdp"])
    assert "one GPU of 8 under FSDP2" in capsys.readouterr().out
    for args, says in (
        (["--gpus=4"], "add task.parallelism=fsdp"),
        (["task.parallelism=fsdp", "--gpus=0"], "--gpus=0: give the number of GPUs"),
        (["--gpu=4"], "unknown flag --gpu=4"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["info", "model=tiny", *args])
        assert exited.value.code == 2 and says in capsys.readouterr().err


@NEEDS_FSDP2
def test_docs_hold_the_fsdp_table_the_plan_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/gpu.md's what-fits table is `scripts/fsdp_memory_table.py`'s output for the code as it is now (on a torch
    that runs FSDP2, whose SDPA attends grouped-query heads without repeating K and V)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    script = importlib.import_module("fsdp_memory_table")
    assert script.main(["--check"]) == 0
    assert "| llama2_7b | static_75 | 1 x 4096 |" in script.table()

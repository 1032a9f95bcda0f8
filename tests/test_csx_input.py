"""The CS-2 input workers' input functions: masked_dense's block order, sharding, restarts, what is shipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelzoo.backends.cerebras.cluster import worker_python_path
from modelzoo.data.csx_input import Shard, TrainBatches, eval_input, read_blocks, train_input
from modelzoo.data.loader import BlockLoader
from modelzoo.data.shards import ShardWriter

BLOCKS, SEQ = 50, 9  # 50 blocks of 9 tokens; block i starts with token i, so a batch names its blocks


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    """A prepared corpus's training split in shards of 16 blocks (as `modelzoo.data.prepare` writes them)."""
    blocks = np.arange(BLOCKS * SEQ, dtype=np.uint16).reshape(BLOCKS, SEQ) % 1000
    blocks[:, 0] = np.arange(BLOCKS)
    writer = ShardWriter(tmp_path / "corpus" / "train", SEQ, np.uint16, shard_blocks=16)
    writer.add(0, blocks.ravel(), BLOCKS)
    meta = {"seq_len": SEQ - 1, "splits": {"train": {"records": writer.finish()}}}
    (tmp_path / "corpus" / "meta.json").write_text(json.dumps(meta))
    return str(tmp_path / "corpus" / "train")


def block_ids(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_batches_follow_masked_dense_block_order_across_epochs(corpus: str) -> None:
    """1 worker on 1 CS-2 streams exactly BlockLoader's batches (one rank, micro-batch = global batch), (B, T)."""
    ours = iter(TrainBatches(corpus, 8, seed=3))
    reference = BlockLoader([read_blocks(corpus)], 8, seed=3)
    for _ in range(3 * BLOCKS // 8):  # three epochs, each reshuffled
        (x, y), (rx, ry) = next(ours), reference.next_batch()
        assert x.shape == (8, SEQ - 1) and x.dtype == torch.int64
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize(("workers", "systems"), [(1, 1), (2, 1), (2, 2)])
def test_shards_are_disjoint_and_cover_an_epoch(corpus: str, workers: int, systems: int) -> None:
    """Driven with explicit worker and system indices, the shards stream disjoint blocks whose union is every
    global batch of the epoch, each CS-2 its slice of each global batch in order."""
    batch = 8
    per_epoch = BLOCKS // batch  # 6 global batches, 2 blocks left over
    streamed: dict[int, list[int]] = {}  # global batch index -> blocks, in CS-2 order
    for system in range(systems):
        for worker in range(workers):
            shard = Shard(workers, worker, systems, system)
            batches = iter(TrainBatches(corpus, batch, seed=1, shard=shard))
            for index in range(worker, per_epoch, workers):
                x, _ = next(batches)
                assert x.shape[0] == batch // systems
                streamed.setdefault(index, []).extend(block_ids(x))
    full = TrainBatches(corpus, batch, seed=1)
    assert sorted(streamed) == list(range(per_epoch))
    for index, ids in streamed.items():
        assert ids == full.global_batch(index).tolist()
    every = [b for ids in streamed.values() for b in ids]
    assert len(every) == len(set(every)) == per_epoch * batch


def test_state_restarts_the_stream_where_it_stopped(corpus: str) -> None:
    """After `load_state_dict` of a state taken after 9 batches (into the second epoch), a new loader streams
    the batches that would have come next; the workers' states aggregate into it."""
    first = TrainBatches(corpus, 8, seed=5)
    stream = iter(first)
    for _ in range(9):
        next(stream)
    state = first.aggregate_state_dict([first.state_dict()])
    assert state == {"global_batches": 9}
    again = TrainBatches(corpus, 8, seed=5)
    again.load_state_dict(first.deaggregate_state_dict(state))
    for (a, _), (b, _) in zip(iter(again), stream, strict=False):
        assert torch.equal(a, b)
        if again.next_global == 15:
            break


def test_eval_batches_are_fixed_size_and_in_order(corpus: str) -> None:
    batches = eval_input(corpus, 8)
    assert len(batches) == BLOCKS // 8 and all(x.shape == (8, SEQ - 1) for x, _ in batches)
    assert [b for x, _ in batches for b in block_ids(x)] == list(range(48))
    assert len(eval_input(corpus, 8, max_batches=2)) == 2


def test_input_function_pickles_by_reference_and_imports_from_the_python_path(corpus: str, tmp_path: Path) -> None:
    """What cstorch puts into a run request (dill, recurse=True, as `fw_user_serialize`) is the function by
    reference and its small arguments, never the corpus; a worker with only `cluster.python_paths` and the
    non-editable packages (a `python -S` with those on PYTHONPATH) imports it and streams."""
    dill = pytest.importorskip("dill")
    builder = dill.dumps(train_input, recurse=True)
    inputs = dill.dumps(((corpus, 8, 1), {}), recurse=True)
    assert len(builder) < 1024 and len(inputs) < 1024
    assert len(builder) + len(inputs) < sum(path.stat().st_size for path in Path(corpus).glob("*.bin"))
    site = [p for p in sys.path if p.endswith("site-packages")]
    worker = f"""
import importlib.util, dill, sys
assert importlib.util.find_spec("modelzoo.backends") is None, "the editable install leaked into the worker"
fn = dill.loads(bytes.fromhex("{builder.hex()}"))
args, kwargs = dill.loads(bytes.fromhex("{inputs.hex()}"))
x, y = next(iter(fn(*args, **kwargs)))
print(fn.__module__, tuple(x.shape), sorted(m for m in sys.modules if m.startswith("modelzoo")))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker_python_path()), *site])}
    result = subprocess.run(
        [sys.executable, "-S", "-c", worker], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    module, shape, modules = result.stdout.split(" ", 2)
    assert module == "modelzoo.data.csx_input" and shape == "(8,"
    assert "modelzoo.backends" not in modules

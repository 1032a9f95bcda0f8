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


def stream_executor(
    corpus: str, workers: int, systems: int, state: dict | None, steps: int, checkpoints: list[int], stop: int
) -> tuple[list[list[int]], dict[int, dict]]:
    """One executor as cstorch's appliance runs it, from the aggregate `state` (None: a fresh run).

    Each worker builds its loader afresh and loads `state` (cstorch's streamer, `PyTorchGenerator`), behind
    cstorch's own data pipe up to its `DataLoaderCheckpointer`, which calls the loader's `state_dict` under the
    worker state at the (1-based) `checkpoints` and the last of `steps`; at global step `j` every CS-2 takes a batch
    from its worker of local rank `j % workers` (cstorch's round robin). The executor dies after `stop` steps.
    Returns the block ids of each global batch consumed and the aggregate state at each checkpoint reached.
    """
    from cerebras.pytorch.utils.data.dataloader import DataLoaderCheckpoint
    from cerebras.pytorch.utils.data.streamer.data_pipe import DataLoaderCheckpointer, Repeater, TensorNamer

    batch = 8
    pipes, loaders = {}, {}
    for system in range(systems):
        for worker in range(workers):
            loader = TrainBatches(corpus, batch, seed=2, shard=Shard(workers, worker, systems, system))
            if state is not None:
                loader.load_state_dict(loader.deaggregate_state_dict(state))
            place = DataLoaderCheckpoint(
                local_worker_id=worker,
                num_workers_per_csx=workers,
                num_csx=systems,
                wse_id=system,
                appliance_step=0,
                worker_step=0,
                samples_streamed=0,
                user_state_dict=None,
            )
            schedule = [0, *checkpoints, steps]
            pipe = DataLoaderCheckpointer(TensorNamer(Repeater(loader)), loader, place, batch // systems, schedule)
            pipes[worker, system], loaders[worker, system] = iter(pipe), pipe
    consumed = []
    for step in range(stop):
        ids = []
        for system in range(systems):
            x = next(iter(next(pipes[step % workers, system]).values()))
            ids.extend(x[:, 0].tolist())
        consumed.append(ids)
    user_node = TrainBatches(corpus, batch, seed=2)
    saved = {
        at: user_node.aggregate_state_dict([p.state_dict(at).user_state_dict for p in loaders.values()])
        for at in [*checkpoints, steps]
        if at <= stop
    }
    return consumed, saved


@pytest.mark.cerebras
@pytest.mark.parametrize(("workers", "systems"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_restarts_stream_every_global_batch_once_in_order(
    cstorch, corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, systems: int
) -> None:
    """Three executors of 5 steps (odd, so restarts fall between a worker's turns), each restarted from the state
    cstorch aggregated at the previous one's last step, then a fourth killed after step 4 and resumed from its
    checkpoint at step 3: the system consumes global batches 0, 1, 2, ... exactly once and in order (the step
    after the checkpoint is trained again, as a resumed run does). Catches a state that forgets where its
    executor started (replays from executor 2 on), and a round robin by absolute batch index (swapped pairs)."""
    monkeypatch.chdir(tmp_path)  # the DataLoaderCheckpointer writes its cache in the working directory
    reference = TrainBatches(corpus, 8, seed=2)
    consumed, state = [], None
    for _ in range(3):
        batches, saved = stream_executor(corpus, workers, systems, state, 5, [], 5)
        consumed += batches
        state = saved[5]
    after_three = state
    batches, saved = stream_executor(corpus, workers, systems, state, 5, [3], 4)  # killed after step 4
    consumed += batches[:3]  # what the checkpoint at step 3 holds; step 4 is lost with the process
    batches, _ = stream_executor(corpus, workers, systems, saved[3], 5, [], 5)
    consumed += batches
    assert [reference.global_batch(i).tolist() for i in range(len(consumed))] == consumed
    assert len(consumed) == 15 + 3 + 5
    assert after_three == {"samples_streamed": 15 * 8}  # Model Zoo's form: global samples


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

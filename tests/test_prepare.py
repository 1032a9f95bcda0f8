"""Data at scale: parallel, resumable preparation into shards; mixtures; the loader's global position; Cerebras HDF5."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import h5py
import numpy as np
import psutil
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from modelzoo import atomic
from modelzoo import checkpoint as ckpt
from modelzoo.cli import main
from modelzoo.config import load_config, to_object
from modelzoo.data import cerebras_hdf5, prepare
from modelzoo.data import documents as documents_module
from modelzoo.data import tokenizer as tokenizer_module
from modelzoo.data.config import DataConfig, SourceConfig, TokenizerConfig, describe
from modelzoo.data.corpus import load_corpus
from modelzoo.data.documents import held_out
from modelzoo.data.loader import BlockLoader
from modelzoo.data.prepare import prepare_source
from modelzoo.data.shards import ShardWriter
from modelzoo.data.tokenizer import TOKENIZER_FILES, build_tokenizer
from modelzoo.data.workers import Workers, encode_chunk
from modelzoo.errors import ConfigError, DataError, DiskFullError
from modelzoo.tasks.pretrain import Pretraining
from modelzoo.validate import validate
from tests.conftest import make_config, run_command, train_losses
from tests.test_data import SEQ_LEN, TRAIN_DOCS, VALIDATION_DOCS, documents, encode_documents, write_lines
from tests.test_disk_full import full_disk

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "modelzoo" / "data" / "samples" / "pubmed"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    root = tmp_path_factory.mktemp("tokenizer")
    train = write_lines(root / "train.txt", TRAIN_DOCS)
    return build_tokenizer(TokenizerConfig(vocab_size=300), DataConfig(train_files=[train], cache_dir=str(root)))


def corpus_config(root: Path, count: int = 600, **overrides: object) -> DataConfig:
    train = write_lines(root / "train.txt", documents(count, seed=5))
    validation = write_lines(root / "validation.txt", VALIDATION_DOCS)
    fields = {"seq_len": SEQ_LEN, "shard_blocks": 64, "cache_dir": str(root / "cache"), "num_workers": 1, **overrides}
    return DataConfig(train_files=[train], validation_files=[validation], **fields)


def shard_bytes(cfg: DataConfig, fingerprint: str) -> dict[str, bytes]:
    directory = Path(cfg.cache_dir) / "corpus" / fingerprint
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("shard_*"))}


# ---- preparation -----------------------------------------------------------------------------------------------


def test_one_and_two_workers_give_identical_shards(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    one = corpus_config(tmp_path, num_workers=1)
    two = corpus_config(tmp_path, num_workers=2, cache_dir=str(tmp_path / "cache2"))
    first, second = load_corpus(one, tokenizer), load_corpus(two, tokenizer)
    assert first.fingerprint == second.fingerprint  # the worker count is not part of the corpus
    shards = shard_bytes(one, first.fingerprint)
    assert len(shards) > 2 * 40  # many shards of 64 blocks, .bin and .json each
    assert shards == shard_bytes(two, second.fingerprint)
    stream = encode_documents(tokenizer, documents(600, seed=5))
    assert np.asarray(first.train).ravel().tolist() == stream[: len(first.train) * (SEQ_LEN + 1)]


def test_interrupted_preparation_continues_after_its_last_shard(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare, "CHUNK_DOCS", 16)  # chunks smaller than shards: resumes start mid-stream
    reference = corpus_config(tmp_path, count=800, cache_dir=str(tmp_path / "reference"))
    expected = shard_bytes(reference, load_corpus(reference, tokenizer).fingerprint)
    cfg = corpus_config(tmp_path, count=800)
    publish, calls = ShardWriter._publish, []

    def crash_after_20(self: ShardWriter, count: int) -> None:
        calls.append(count)
        if len(calls) == 21:
            raise KeyboardInterrupt("killed mid-preparation")
        publish(self, count)

    monkeypatch.setattr(ShardWriter, "_publish", crash_after_20)
    with pytest.raises(KeyboardInterrupt):
        load_corpus(cfg, tokenizer)
    fingerprint = prepare.corpus_fingerprint(cfg, tokenizer)
    directory = Path(cfg.cache_dir) / "corpus" / fingerprint
    assert not (directory / "meta.json").exists()
    assert prepare.read_meta(directory) is None  # nothing half-prepared is ever read
    kept = {p.name: p.stat().st_ino for p in (directory / "train").glob("shard_*.bin")}
    assert len(kept) == 20
    monkeypatch.setattr(ShardWriter, "_publish", publish)
    resumed_from = []
    monkeypatch.setattr(prepare, "_document_chunks", _recording(prepare._document_chunks, resumed_from))
    report = load_corpus(cfg, tokenizer).sources[0].report
    last = json.loads((directory / "train" / "shard_00019.json").read_text())["resume"]
    assert resumed_from == [last["chunk"]] and last["chunk"] > 0  # tokenising restarted after the last shard
    assert {p.name: p.stat().st_ino for p in (directory / "train").glob("shard_*.bin") if p.name in kept} == kept
    assert shard_bytes(cfg, fingerprint) == expected
    # The throughput is this run's: the tokens it tokenised (from the resumed chunk's start on, and the validation
    # split) over its own time, not every token of the corpus (on main: all tokens, 887k tok/s against the 468k
    # its progress bar showed).
    published = 20 * 64 * (SEQ_LEN + 1)
    earlier = published - last["skip"]
    assert report.new_tokens == report.splits["train"].tokens - earlier + report.splits["validation"].tokens
    assert f"{report.new_tokens:,} tokens tokenised by this run in {report.seconds:.1f} s: " in report.format()
    assert f"{report.new_tokens / report.seconds:,.0f} tokens/s (continuing a preparation that had done " in (
        report.format()
    )


def _recording(function, calls: list):
    def wrapped(cfg, split, first):
        if split == "train":
            calls.append(first)
        return function(cfg, split, first)

    return wrapped


KILL_SCRIPT = """
import sys
from transformers import PreTrainedTokenizerFast
from modelzoo.data.config import DataConfig
from modelzoo.data.corpus import load_corpus
root, tokenizer = sys.argv[1], PreTrainedTokenizerFast(tokenizer_file=sys.argv[2], eos_token="<|endoftext|>")
cfg = DataConfig(train_files=[root + "/train.txt"], validation_files=[root + "/validation.txt"], seq_len=16,
                 shard_blocks=64, cache_dir=root + "/cache", num_workers=2)
load_corpus(cfg, tokenizer, progress=False)
"""


@pytest.mark.slow
def test_sigkilled_preparation_leaves_no_workers_and_resumes_to_the_same_shards(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    count = 8000
    reference = corpus_config(tmp_path, count, cache_dir=str(tmp_path / "reference"))
    expected = shard_bytes(reference, load_corpus(reference, tokenizer).fingerprint)
    cfg = corpus_config(tmp_path, count, num_workers=2)
    directory = Path(cfg.cache_dir) / "corpus" / prepare.corpus_fingerprint(cfg, tokenizer)
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text(tokenizer.backend_tokenizer.to_str())
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(tokenizer_file)])
    deadline = time.monotonic() + 120
    while not (directory / "train" / "shard_00020.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the preparation ended before it was killed"
        time.sleep(0.05)
    workers = psutil.Process(process.pid).children()
    assert len(workers) == 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers {[p.pid for p in alive]} outlived their killed parent"
    assert not (directory / "meta.json").exists()
    published = len(list((directory / "train").glob("shard_*.json")))
    assert 20 < published < len(expected) // 2
    corpus = load_corpus(cfg, tokenizer)
    assert shard_bytes(cfg, corpus.fingerprint) == expected


def test_held_out_validation_is_chosen_by_document_hash(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    docs = documents(800, seed=9)
    train = write_lines(tmp_path / "train.txt", docs)
    cfg = DataConfig(train_files=[train], validation_fraction=0.1, seq_len=SEQ_LEN, cache_dir=str(tmp_path / "c"))
    corpus = load_corpus(cfg, tokenizer)
    held = [doc for doc in docs if held_out(doc, 0.1)]
    assert 0.07 < len(held) / len(docs) < 0.13  # 800 draws at 10%: std 1.1%
    kept = [doc for doc in docs if not held_out(doc, 0.1)]
    for blocks, chosen in ((corpus.validation, held), (corpus.train, kept)):
        stream = encode_documents(tokenizer, chosen)
        assert np.asarray(blocks).ravel().tolist() == stream[: len(blocks) * (SEQ_LEN + 1)]
    shuffled = write_lines(tmp_path / "shuffled.txt", docs[::-1])  # another order: the same documents held out
    reordered = load_corpus(DataConfig(**{**cfg.__dict__, "train_files": [shuffled]}), tokenizer)
    assert reordered.sources[0].report.splits["validation"].documents == len(held)
    with pytest.raises(ConfigError, match=r"^data\.validation_fraction: .*keep one"):
        load_corpus(DataConfig(**{**cfg.__dict__, "validation_files": [train]}), tokenizer)


def test_file_edited_in_place_is_read_anew(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """The old `datasets` cache keyed local files by path, size and mtime: an edit keeping both was read stale."""
    cfg = corpus_config(tmp_path, count=200)
    path = Path(cfg.train_files[0])
    before = load_corpus(cfg, tokenizer)
    stat = path.stat()
    text = path.read_text()
    assert "cancer" in text
    path.write_text(text.replace("cancer", "kinase", 3))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    after = load_corpus(cfg, tokenizer)
    stream = encode_documents(tokenizer, path.read_text().splitlines())
    assert np.asarray(after.train).ravel().tolist() == stream[: len(after.train) * (SEQ_LEN + 1)]
    assert not np.array_equal(np.asarray(after.train), np.asarray(before.train))


def test_dry_run_estimates_the_prepared_size(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = corpus_config(tmp_path, count=3000, shard_blocks=4096)
    text = prepare.estimate(cfg, tokenizer)
    assert not (tmp_path / "cache" / "corpus").exists()
    estimated = int(re.search(r"train .*~([\d,]+) tokens", text).group(1).replace(",", ""))
    actual = load_corpus(cfg, tokenizer).train_tokens
    assert abs(estimated - actual) / actual < 0.05  # measured: 1-2% on this corpus


def test_prepare_data_command_reports_and_fills_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = corpus_config(tmp_path, count=300)
    overrides = [
        f"data.train_files=[{cfg.train_files[0]}]",
        f"data.validation_files=[{cfg.validation_files[0]}]",
        f"data.cache_dir={cfg.cache_dir}",
        "data.num_workers=2",
        "tokenizer.vocab_size=300",
        "model.n_positions=16",
    ]
    main(["prepare-data", "--dry-run", *overrides])
    assert "~" in capsys.readouterr().out and not (tmp_path / "cache" / "corpus").exists()
    main(["prepare-data", *overrides, f"--cerebras-hdf5={tmp_path / 'h5'}"])
    out = capsys.readouterr().out
    assert re.search(r"train +300 documents, [\d,]+ tokens", out), out
    assert len(list((tmp_path / "cache" / "corpus").glob("*/meta.json"))) == 1
    # The corpus is named by the user's files (<tmp_path>/train.txt: a split's name, so by its folder), in the
    # report and the HDF5 folders; on main it was the default node's `pubmed_sample`.
    name = tmp_path.name
    assert f"corpus {name}: " in out and f"cerebras_hdf5 {name} train: " in out and "pubmed_sample" not in out
    written = {p.name for p in (tmp_path / "h5" / name / "train").iterdir()}
    assert {"data_params.json", "output_chunk_0_00000.h5", *TOKENIZER_FILES} <= written


def test_readme_hdf5_command_trains_on_prepare_data_output(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prepare-data --cerebras-hdf5=h5` writes the tokenizer it used beside the shards; the README's command form
    then trains on them with directories relative to the cwd and no tokenizer named: the run's identity hashes
    the directories' files, and the tokenizer is the one found there (its sha256 the one `data_params.json`
    names). A tokenizer there that is not the one the shards were made with is refused naming both sha256s.
    Catches a directory handed unexpanded to identity (on main: "h5/.../train: no such file", exit 2) and a run
    that cannot find the shards' tokenizer ("already tokenised: give the tokenizer"); the corpus files a CS-2's
    workers get are absolute under a relative `data.cache_dir`."""
    monkeypatch.chdir(tmp_path)
    prepared = corpus_config(tmp_path, count=300)
    main(
        [
            "prepare-data",
            f"data.train_files=[{prepared.train_files[0]}]",
            f"data.validation_files=[{prepared.validation_files[0]}]",
            f"data.cache_dir={tmp_path / 'cache'}",
            "tokenizer.vocab_size=300",
            "model.n_positions=16",
            "--cerebras-hdf5=h5",
        ]
    )
    train = Path("h5") / tmp_path.name / "train"  # the corpus is named by its files' folder
    declared = json.loads((train / cerebras_hdf5.PARAMS).read_text())["processing"]["modelzoo_tokenizer_sha256"]
    command = [
        "data.format=cerebras_hdf5",
        f"data.train_files=[{train}]",
        f"data.validation_files=[h5/{tmp_path.name}/validation]",
        "model.n_positions=16",
        "task.max_steps=3",
        "task.eval_every=3",
        "task.checkpoint_every=3",
        "task.log_every=1",
        "task.export=false",
    ]
    trainer = Pretraining(make_config(tmp_path / "run", Path("run-cache"), *command))  # data.cache_dir relative
    assert prepare.tokenizer_fingerprint(trainer.tokenizer) == declared
    # What a CS-2's input workers are handed: absolute paths (they run in a working directory of their own).
    assert all(path.is_absolute() and path.is_dir() for path in trainer.data_files())
    trainer.fit()
    assert trainer.loop.step == 3 and len(train_losses(tmp_path / "run")) == 3
    identity = ckpt.read_identity(ckpt.latest_checkpoint(tmp_path / "run"))
    assert identity["data.sources"]["train"] == [str(train / "output_chunk_0_00000.h5")]

    tokenizer.save_pretrained(train)  # another tokenizer beside the shards
    ours = prepare.tokenizer_fingerprint(tokenizer)
    with pytest.raises(
        DataError, match=rf"tokenised with another tokenizer \(.*{declared}\) than this run's \(.*{ours}\)"
    ):
        Pretraining(make_config(tmp_path / "other", tmp_path / "other-cache", *command))


# ---- own files: the format follows the extension (issue 16) -------------------------------------------------------


def own_files_config(tmp_path: Path, train_lines: list[str], *extra: str) -> DataConfig:
    train = write_lines(tmp_path / "x.jsonl", train_lines)
    validation = write_lines(tmp_path / "y.jsonl", [json.dumps({"text": d}) for d in VALIDATION_DOCS])
    overrides = [f"data.train_files=[{train}]", f"data.validation_files=[{validation}]"]
    cfg = to_object(load_config([*overrides, f"data.cache_dir={tmp_path / 'cache'}", "model.n_positions=16", *extra]))
    validate(cfg)
    return cfg.data


def test_own_json_lines_files_are_read_as_json(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = own_files_config(tmp_path, [json.dumps({"text": d}) for d in TRAIN_DOCS])
    assert cfg.format == "auto"
    assert describe(cfg) == str(tmp_path / "x.jsonl")  # the log names the files, not pubmed_sample
    assert cfg.name == "x"  # and so does the corpus's name (prepare's report, --cerebras-hdf5 folders)
    corpus = load_corpus(cfg, tokenizer)
    stream = encode_documents(tokenizer, TRAIN_DOCS)
    assert np.asarray(corpus.train).ravel().tolist() == stream[: len(corpus.train) * (SEQ_LEN + 1)]
    assert not tokenizer.decode(corpus.train[0]).startswith('{"text"')


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (["data.train_files=[/d/notes.jsonl.gz]"], "notes"),
        (["data.train_files=[/d/abstracts/train.txt]"], "abstracts"),  # a split's name: the folder's
        (["data.train_files=[/d/my corpus/*.txt]"], "my_corpus"),  # a glob: the folder's, as one folder name
        (["data.train_files=[/d/notes.txt]", "data.name=mine"], "mine"),  # a name given wins
        (["data.validation_files=[/d/v.txt]"], "pubmed_sample"),  # trained on the node's own files
        ([], "pubmed_sample"),
    ],
)
def test_a_corpus_is_named_by_the_files_it_reads(overrides: list[str], name: str) -> None:
    assert to_object(load_config(overrides)).data.name == name
    assert DataConfig(hub_name="ccdv/pubmed-summarization").name == "ccdv_pubmed-summarization"


@pytest.mark.parametrize(
    ("lines", "extra", "line", "message"),
    [
        (['{"text": "a b c"}', '{"text": "a b'], [], 2, "invalid JSON"),
        (['{"text": "a b c"}', '{"body": "d e"}'], [], 2, "record has no 'text' field"),
        (['{"abstract": "a b c"}'], [], 1, "record has no 'text' field (fields: 'abstract'); set data.text_field"),
        (['{"abstract": "a b c"}', '{"text": "x"}'], ["data.text_field=abstract"], 2, "no 'abstract' field"),
    ],
)
def test_own_files_fail_naming_file_and_line(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, lines: list[str], extra: list[str], line: int, message: str
) -> None:
    cfg = own_files_config(tmp_path, lines, *extra)
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'x.jsonl'))}:{line}: .*{re.escape(message)}"):
        load_corpus(cfg, tokenizer)


def test_explicit_format_and_the_shipped_sample_keep_text() -> None:
    assert to_object(load_config([])).data.format == "text"
    explicit = to_object(load_config(["data.train_files=[a.jsonl]", "data.format=text"]))
    assert explicit.data.format == "text"


def test_malformed_line_in_file_37_of_500_publishes_nothing(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    folder = tmp_path / "dump"
    folder.mkdir()
    for i in range(500):
        records = [json.dumps({"text": doc}) for doc in documents(3, seed=100 + i)]
        if i == 36:
            records[1] = records[1][:-2]
        write_lines(folder / f"part_{i:03d}.jsonl", records)
    validation = write_lines(tmp_path / "validation.txt", VALIDATION_DOCS)
    cfg = DataConfig(
        train_files=[str(folder / "*.jsonl")],
        validation_files=[validation],
        seq_len=SEQ_LEN,
        shard_blocks=1,
        cache_dir=str(tmp_path / "cache"),
        num_workers=2,
    )
    with pytest.raises(DataError, match=f"^{re.escape(str(folder / 'part_036.jsonl'))}:2: invalid JSON"):
        load_corpus(cfg, tokenizer)
    assert not list((tmp_path / "cache").rglob("shard_*"))


# ---- shards at training time -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "int32"])
def test_damaged_shard_is_refused_naming_it(tmp_path: Path, tokenizer: PreTrainedTokenizerFast, damage: str) -> None:
    cfg = corpus_config(tmp_path, count=200)
    corpus = load_corpus(cfg, tokenizer)
    shard = Path(corpus.train.paths[3])
    tokens = np.fromfile(shard, dtype=np.uint16)
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-7])
    else:
        tokens.astype(np.int32).tofile(shard)
    with pytest.raises(DataError, match=f"^{re.escape(str(shard))}: .*truncated or written with another dtype"):
        load_corpus(cfg, tokenizer)


def test_shard_overwritten_with_valid_tokens_fails_its_checksum(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Our shards' CRC-32, checked when a run opens the corpus: same size, valid ids, other tokens."""
    cfg = corpus_config(tmp_path, count=200)
    shard = Path(load_corpus(cfg, tokenizer).train.paths[2])
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[100:400] = np.roll(tokens[100:400], 1)
    tokens.tofile(shard)
    with pytest.raises(DataError, match=f"^{re.escape(str(shard))}: checksum mismatch .* prepare it again$"):
        load_corpus(cfg, tokenizer)


def test_damaged_hdf5_chunk_is_refused_naming_file_and_samples(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    blocks = np.random.default_rng(0).integers(0, len(tokenizer), size=(20, SEQ_LEN + 1))
    train, validation = tmp_path / "train.h5", tmp_path / "validation.h5"
    write_cerebras_like(train, samples_of(blocks[:15]))
    write_cerebras_like(validation, samples_of(blocks[15:]))
    with h5py.File(train) as f:
        chunk = f["data"].id.get_chunk_info(7)  # sample 7's gzip chunk
    raw = bytearray(train.read_bytes())
    raw[chunk.byte_offset : chunk.byte_offset + chunk.size] = bytes(chunk.size)
    train.write_bytes(bytes(raw))
    cfg = DataConfig(
        train_files=[str(train)],
        validation_files=[str(validation)],
        format="cerebras_hdf5",
        seq_len=SEQ_LEN,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(DataError, match=rf"^{re.escape(str(train))}: samples 0-14 of 'data' cannot be decoded \("):
        load_corpus(cfg, tokenizer)


def test_sharded_blocks_index_like_an_array_and_pickle_as_paths(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    import pickle

    blocks = load_corpus(corpus_config(tmp_path, count=200), tokenizer).train
    whole = np.asarray(blocks)
    rows = np.array([0, 9, 8, len(blocks) - 1, -1, 17])
    np.testing.assert_array_equal(blocks[rows], whole[rows])
    np.testing.assert_array_equal(blocks[5:30:3], whole[5:30:3])
    np.testing.assert_array_equal(blocks[:2, :-1], whole[:2, :-1])
    np.testing.assert_array_equal(blocks[-3], whole[-3])
    pickled = pickle.dumps(blocks)
    assert len(pickled) < whole.nbytes / 4
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickled)), whole)


# ---- the loader's position: a global sample index ------------------------------------------------------------------


def stream_of(loader: BlockLoader, batches: int) -> list[int]:
    return torch.cat([loader.next_batch()[0] for _ in range(batches)])[:, 0].tolist()


def global_stream(loaders: list[BlockLoader], steps: int) -> list[int]:
    """The samples all ranks read over `steps` micro-batch steps, in rank order within each step."""
    out = []
    for _ in range(steps):
        for loader in loaders:
            out.extend(loader.next_batch()[0][:, 0].tolist())
    return out


@pytest.mark.parametrize(
    ("before", "after"), [((16, 1), (8, 1)), ((8, 1), (16, 1)), ((4, 1), (2, 2)), ((2, 2), (4, 1))]
)
def test_resume_with_another_micro_batch_size_or_world_size_continues_the_stream(
    before: tuple[int, int], after: tuple[int, int]
) -> None:
    """The old loader counted micro-batches: 16 -> 8 replayed blocks and 8 -> 16 failed with a raw ValueError."""
    blocks = np.arange(94 * 8 * 5, dtype=np.uint16).reshape(-1, 5)  # 752 blocks
    uninterrupted = stream_of(BlockLoader([blocks], batch_size=16, seed=3), 64)  # 1,024 samples: into epoch 2
    (b0, w0), (b1, w1) = before, after
    first = [BlockLoader([blocks], batch_size=b0, seed=3, rank=r, world_size=w0) for r in range(w0)]
    consumed = global_stream(first, 320 // (b0 * w0))
    state = json.loads(json.dumps(first[0].state_dict()))
    second = [BlockLoader([blocks], batch_size=b1, seed=3, rank=r, world_size=w1) for r in range(w1)]
    for loader in second:
        loader.load_state_dict(state)
    resumed = global_stream(second, (1024 - 320) // (b1 * w1))
    assert consumed + resumed == uninterrupted


def test_loader_refuses_a_state_of_another_layout() -> None:
    loader = BlockLoader([np.zeros((10, 5), np.uint16)], batch_size=2, seed=0)
    with pytest.raises(ValueError, match="no global sample index"):
        loader.load_state_dict({"epoch": 0, "position": 3})
    with pytest.raises(ValueError, match="does not fit 1 source"):
        loader.load_state_dict({"sample": 4, "drawn": [2, 2]})


# ---- mixtures ------------------------------------------------------------------------------------------------------


def two_sources() -> list[np.ndarray]:
    return [np.zeros((50, 5), np.uint16), np.ones((30, 5), np.uint16)]


def test_mixture_draws_its_sources_at_their_weights() -> None:
    loader = BlockLoader(two_sources(), batch_size=50, seed=11, weights=[0.7, 0.3], names=["abstracts", "pmc"])
    drawn = np.array(stream_of(loader, 400))  # 20,000 samples
    share = (drawn == 0).mean()
    # Binomial standard deviation at N = 20,000: sqrt(0.7 * 0.3 / N) = 0.0032; the tolerance is 4 of them.
    assert abs(share - 0.7) < 0.013
    assert loader.tokens_per_source(4) == {"abstracts": int((drawn == 0).sum()) * 4, "pmc": int((drawn == 1).sum()) * 4}
    equal = np.array(stream_of(BlockLoader(two_sources(), batch_size=50, seed=11), 400))
    assert abs((equal == 0).mean() - 0.5) < 0.013


def test_mixture_visits_every_block_of_a_source_once_per_epoch() -> None:
    sources = [
        np.arange(50 * 5, dtype=np.uint16).reshape(50, 5),
        1000 + np.arange(30 * 5, dtype=np.uint16).reshape(30, 5),
    ]
    drawn = stream_of(BlockLoader(sources, batch_size=10, seed=2, weights=[0.5, 0.5]), 30)
    first = [block for block in drawn if block >= 1000][:30]
    assert sorted(first) == sorted(sources[1][:, 0].tolist())


@pytest.mark.parametrize("consumed", [1, 7, 33])
def test_mixture_resume_is_exact(consumed: int) -> None:
    sources = [
        np.arange(50 * 5, dtype=np.uint16).reshape(50, 5),
        1000 + np.arange(30 * 5, dtype=np.uint16).reshape(30, 5),
    ]
    uninterrupted = BlockLoader(sources, batch_size=4, seed=5, weights=[0.7, 0.3])
    expected = stream_of(uninterrupted, consumed + 40)
    original = BlockLoader(sources, batch_size=4, seed=5, weights=[0.7, 0.3])
    assert stream_of(original, consumed) == expected[: consumed * 4]
    restored = BlockLoader(sources, batch_size=2, seed=5, weights=[0.7, 0.3])  # and another micro-batch size
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert stream_of(restored, 80) == expected[consumed * 4 :]
    assert restored.tokens_per_source(1) == uninterrupted.tokens_per_source(1)


def mixture(tmp_path: Path, *sources: SourceConfig) -> DataConfig:
    return DataConfig(sources=list(sources), seq_len=SEQ_LEN, cache_dir=str(tmp_path / "cache"), shard_blocks=256)


def test_mixture_prepares_each_source_once(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    a = write_lines(tmp_path / "a.txt", documents(300, seed=1))
    b = write_lines(tmp_path / "b.jsonl", [json.dumps({"body": d}) for d in documents(200, seed=2)])
    cfg = mixture(
        tmp_path,
        SourceConfig(name="abstracts", weight=0.7, train_files=[a], validation_fraction=0.05),
        SourceConfig(name="pmc", weight=0.3, train_files=[b], text_field="body", validation_fraction=0.05),
    )
    corpus = load_corpus(cfg, tokenizer)
    assert [(s.name, s.weight) for s in corpus.sources] == [("abstracts", 0.7), ("pmc", 0.3)]
    alone = load_corpus(
        DataConfig(**{**cfg.__dict__, "sources": [], "train_files": [a], "validation_fraction": 0.05}), tokenizer
    )
    np.testing.assert_array_equal(np.asarray(corpus.sources[0].train), np.asarray(alone.train))
    assert len(corpus.validation) == sum(len(s.validation) for s in corpus.sources)
    assert len(list((tmp_path / "cache" / "corpus").glob("*/meta.json"))) == 2


def test_mixture_bad_input_names_the_source(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    a = write_lines(tmp_path / "a.txt", TRAIN_DOCS)
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.weight: pmc: must be > 0, got 0"):
        load_corpus(
            mixture(
                tmp_path, SourceConfig(name="abs", train_files=[a]), SourceConfig(name="pmc", weight=0, train_files=[a])
            ),
            tokenizer,
        )
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.weight: abs: must be > 0, got -1"):
        load_corpus(mixture(tmp_path, SourceConfig(name="abs", weight=-1, train_files=[a])), tokenizer)
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.seq_len: pmc: 32 differs from data\.seq_len=16"):
        load_corpus(
            mixture(
                tmp_path,
                SourceConfig(name="abs", train_files=[a]),
                SourceConfig(name="pmc", seq_len=32, train_files=[a]),
            ),
            tokenizer,
        )


# ---- the hub path, streamed ------------------------------------------------------------------------------------------


def test_hub_dataset_is_streamed(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "pubmed-hub"
    folder.mkdir()
    write_lines(folder / "train.jsonl", [json.dumps({"abstract": d}) for d in TRAIN_DOCS])
    write_lines(folder / "validation.jsonl", [json.dumps({"abstract": d}) for d in VALIDATION_DOCS])
    calls = []
    load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append(kwargs) or load(*args, **kwargs))
    cfg = DataConfig(hub_name=str(folder), text_field="abstract", seq_len=SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg, tokenizer)
    assert calls and all(kwargs["streaming"] for kwargs in calls)
    for blocks, docs in ((corpus.train, TRAIN_DOCS), (corpus.validation, VALIDATION_DOCS)):
        stream = encode_documents(tokenizer, docs)
        assert np.asarray(blocks).ravel().tolist() == stream[: len(blocks) * (SEQ_LEN + 1)]
    with pytest.raises(ConfigError, match=r"^data\.text_field: .*has no column 'body'"):
        load_corpus(DataConfig(**{**cfg.__dict__, "text_field": "body"}), tokenizer)


# ---- Cerebras Model Zoo HDF5 -----------------------------------------------------------------------------------------


def write_cerebras_like(path: Path, samples: np.ndarray) -> None:
    """A file as the Model Zoo's `save_buffer_to_hdf5` writes it: `data` (n, 3, msl) i4, one sample per chunk, gzip."""
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=samples, dtype="i4", chunks=(1, *samples.shape[1:]), compression="gzip")
        f.attrs["n_examples"] = samples.shape[0]


def samples_of(blocks: np.ndarray) -> np.ndarray:
    return np.stack([blocks[:, :-1], np.ones_like(blocks[:, :-1]), blocks[:, 1:]], axis=1).astype(np.int32)


def test_cerebras_hdf5_trains_without_retokenising(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, len(tokenizer), size=(40, SEQ_LEN + 1))
    (tmp_path / "train").mkdir()
    write_cerebras_like(tmp_path / "train" / "output_chunk_0_0.h5", samples_of(blocks[:25]))
    padded = samples_of(blocks[25:30])
    padded[-1, 1, -3:] = 0  # the last sample of a packed file: padding, not trained on
    write_cerebras_like(tmp_path / "train" / "output_chunk_0_1.h5", padded)
    write_cerebras_like(tmp_path / "validation.h5", samples_of(blocks[30:]))
    cfg = DataConfig(
        train_files=[str(tmp_path / "train")],
        validation_files=[str(tmp_path / "validation.h5")],
        format="cerebras_hdf5",
        seq_len=SEQ_LEN,
        cache_dir=str(tmp_path / "cache"),
    )
    corpus = load_corpus(cfg, tokenizer)
    np.testing.assert_array_equal(np.asarray(corpus.train), blocks[:29])
    np.testing.assert_array_equal(np.asarray(corpus.validation), blocks[30:])

    out = tmp_path / "ours"
    cerebras_hdf5.write_hdf5(corpus.train, out, samples_per_file=10, processing={"modelzoo_tokenizer_sha256": "x"})
    files = sorted(out.glob("*.h5"))
    assert [p.name for p in files] == [f"output_chunk_0_0000{i}.h5" for i in range(3)]
    with h5py.File(files[0]) as f:
        assert f["data"].shape == (10, 3, SEQ_LEN) and f["data"].dtype == np.int32 and f.attrs["n_examples"] == 10
        assert f["data"].chunks == (1, 3, SEQ_LEN) and f["data"].compression == "gzip"
        np.testing.assert_array_equal(f["data"][:], samples_of(blocks[:10]))
    params = json.loads((out / "data_params.json").read_text())
    assert params["processing"]["max_seq_length"] == SEQ_LEN and params["post-process"]["n_examples"] == 29

    other = DataConfig(**{**cfg.__dict__, "seq_len": SEQ_LEN * 2})
    with pytest.raises(DataError, match=r"output_chunk_0_0\.h5: max_seq_length is 16 but data\.seq_len=32"):
        load_corpus(other, tokenizer)


def test_cerebras_hdf5_written_with_another_tokenizer_is_refused(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    blocks = np.random.default_rng(1).integers(0, 257, size=(20, SEQ_LEN + 1))
    folder = tmp_path / "pmc"
    folder.mkdir()
    write_cerebras_like(folder / "output_chunk_0_0.h5", samples_of(blocks))
    (folder / "data_params.json").write_text(json.dumps({"processing": {"modelzoo_tokenizer_sha256": "0" * 64}}))
    text = write_lines(tmp_path / "a.txt", TRAIN_DOCS)
    cfg = mixture(
        tmp_path,
        SourceConfig(name="abstracts", train_files=[text], validation_fraction=0.1),
        SourceConfig(name="pmc", train_files=[str(folder)], format="cerebras_hdf5", validation_fraction=0.1),
    )
    with pytest.raises(DataError, match=r"pmc/data_params\.json: source pmc was tokenised with another tokenizer"):
        load_corpus(cfg, tokenizer)
    (folder / "data_params.json").write_text(json.dumps({"processing": {"huggingface_tokenizer": "gpt2"}}))
    second = tmp_path / "c4"
    second.mkdir()
    write_cerebras_like(second / "output_chunk_0_0.h5", samples_of(blocks))
    (second / "data_params.json").write_text(
        json.dumps({"processing": {"huggingface_tokenizer": "EleutherAI/gpt-neox-20b"}})
    )
    both = mixture(
        tmp_path,
        SourceConfig(name="pmc", train_files=[str(folder)], format="cerebras_hdf5", validation_fraction=0.1),
        SourceConfig(name="c4", train_files=[str(second)], format="cerebras_hdf5", validation_fraction=0.1),
    )
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]: the sources were tokenised with different tokenizers"):
        load_corpus(both, tokenizer)


def test_tokenizer_is_not_trained_on_token_shards(tmp_path: Path) -> None:
    folder = tmp_path / "h5"
    folder.mkdir()
    write_cerebras_like(folder / "a.h5", samples_of(np.zeros((2, SEQ_LEN + 1), np.int64)))
    cfg = DataConfig(train_files=[str(folder / "a.h5")], format="cerebras_hdf5", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^tokenizer\.path: .*already tokenised"):
        build_tokenizer(TokenizerConfig(vocab_size=300), cfg)


def test_shards_refused_when_the_disk_is_full(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = corpus_config(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", full_disk(1000))
    with pytest.raises(DiskFullError) as info:
        prepare_source(cfg, tokenizer)
    assert "shard_00000.bin: not enough disk space" in str(info.value) and "1,000 bytes" in str(info.value)
    assert not [p for p in Path(cfg.cache_dir).rglob("*") if ".tmp-" in p.name]


# ---- pathological lines ----------------------------------------------------------------------------------------


def test_two_megabyte_lines_without_spaces_are_prepared_in_seconds(tmp_path: Path) -> None:
    """A 2 MB line of "a" and one of NUL bytes: tokenizer training (once over 600 s) and preparation, with the
    tokenizer's progress logged and its line checks first."""
    train = write_lines(tmp_path / "train.txt", [*TRAIN_DOCS, "a" * 2_000_000, "\0" * 2_000_000])
    validation = write_lines(tmp_path / "validation.txt", VALIDATION_DOCS)
    command = [sys.executable, "-m", "modelzoo", "prepare-data", f"data.train_files=[{train}]"]
    command += [f"data.validation_files=[{validation}]", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=1"]
    started = time.perf_counter()
    result = run_command(command, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.perf_counter() - started < 60
    assert "tokenizer: checked every line of 1 training file(s)" in result.stderr
    assert "vocabulary learned in" in result.stderr


def test_a_bad_line_is_refused_before_the_tokenizer_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(**kwargs: object) -> None:
        raise AssertionError("the tokenizer trainer started before the lines were checked")

    monkeypatch.setattr(tokenizer_module.trainers, "BpeTrainer", no_training)
    train = write_lines(tmp_path / "train.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": '])
    with pytest.raises(DataError, match=rf"^{re.escape(train)}:3: invalid JSON"):
        build_tokenizer(TokenizerConfig(vocab_size=300), DataConfig(train_files=[train], cache_dir=str(tmp_path)))


def test_a_line_over_the_maximum_is_refused_naming_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(documents_module, "MAX_LINE_BYTES", 1000)
    train = write_lines(tmp_path / "train.txt", ["short", "x" * 1500, "short"])
    with pytest.raises(DataError, match=rf"^{re.escape(train)}:2: line longer than the maximum of 1,000 bytes"):
        documents_module.scan_file(train)


def test_a_long_document_encodes_in_pieces_to_the_same_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    text = " ".join(documents(3000, seed=3))  # several PIECE_CHARS, spaces throughout
    assert len(text) > 4 * documents_module.PIECE_CHARS
    with Workers(1, tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id, np.uint16):
        pieces_ids = encode_chunk([text])
    whole = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert pieces_ids.tolist() == [*whole, tokenizer.eos_token_id]

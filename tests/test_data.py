"""The data pipeline: tokenizer training and loading, corpus validation, packing and caching, the loader."""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from modelzoo.data import tokenizer as tokenizer_module
from modelzoo.data.config import DataConfig, TokenizerConfig
from modelzoo.data.corpus import corpus_fingerprint, load_corpus, unigram_loss
from modelzoo.data.loader import BlockLoader, iter_eval
from modelzoo.data.tokenizer import EOS, build_tokenizer
from modelzoo.errors import ConfigError, DataError
from tests.conftest import run_command

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "modelzoo" / "data" / "samples" / "pubmed"
SHARED = Path(__file__).resolve().parents[2] / "shared"
WORDS = ["the", "of", "and", "in", "patients", "with", "cancer", "cell", "gene", "protein", "expression", "tumor"]
WORDS += ["mutation", "BRCA1", "p53", "kinase", "inhibitor", "therapy", "clinical", "trial", "results", "suggest"]
WORDS += ["increased", "risk", "disease", "treatment", "β-catenin", "5", "µg/mL"]
SEQ_LEN = 16


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: hub lookups fail at once instead of retrying."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(count)]


TRAIN_DOCS = documents(120, seed=0)
VALIDATION_DOCS = documents(20, seed=1)


def write_lines(path: Path, lines: list[str]) -> str:
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return str(path)


def data_config(root: Path, train: list[str], validation: list[str], **overrides: object) -> DataConfig:
    return DataConfig(
        train_files=train, validation_files=validation, seq_len=SEQ_LEN, cache_dir=str(root / "cache"), **overrides
    )


@pytest.fixture
def data(tmp_path: Path) -> DataConfig:
    train = write_lines(tmp_path / "train.txt.gz", TRAIN_DOCS)
    validation = write_lines(tmp_path / "validation.txt", VALIDATION_DOCS)
    return data_config(tmp_path, [train], [validation])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    root = tmp_path_factory.mktemp("tokenizer")
    train = write_lines(root / "train.txt", TRAIN_DOCS)
    return build_tokenizer(TokenizerConfig(vocab_size=300), data_config(root, [train], []))


def encode_documents(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> list[int]:
    return [i for doc in docs for i in [*tokenizer.encode(doc, add_special_tokens=False), tokenizer.eos_token_id]]


# ---- tokenizer -------------------------------------------------------------------------------------------


def test_trained_tokenizer_round_trips_and_is_cached(data: DataConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = build_tokenizer(TokenizerConfig(vocab_size=300), data)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert 257 < len(tok) <= 300
    assert tok.convert_tokens_to_ids(EOS) == tok.eos_token_id == 0
    assert tok.eos_token == tok.bos_token == tok.unk_token == tok.pad_token == EOS
    text = "BRCA1 and β-catenin at 5 µg/mL — unseen: ünïcödé 🧬\n  two spaces"
    assert tok.decode(tok.encode(text)) == text
    cached = list((Path(data.cache_dir) / "tokenizers").glob("*/*"))
    assert [path.name for path in cached] == ["tokenizer.json"]

    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *args: pytest.fail("retrained despite the cache"))
    again = build_tokenizer(TokenizerConfig(vocab_size=300), data)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_tokenizer_fingerprint_follows_its_inputs(data: DataConfig, tmp_path: Path) -> None:
    base = tokenizer_module.training_fingerprint(TokenizerConfig(vocab_size=300), data)
    assert base != tokenizer_module.training_fingerprint(TokenizerConfig(vocab_size=301), data)
    assert base != tokenizer_module.training_fingerprint(TokenizerConfig(vocab_size=300, min_frequency=3), data)
    changed = data_config(tmp_path, [write_lines(tmp_path / "other.txt", TRAIN_DOCS[1:])], data.validation_files)
    assert base != tokenizer_module.training_fingerprint(TokenizerConfig(vocab_size=300), changed)


def test_tokenizer_loads_from_a_saved_directory(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text(tokenizer.backend_tokenizer.to_str())
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=EOS).save_pretrained(tmp_path / "saved")
    loaded = build_tokenizer(TokenizerConfig(path=str(tmp_path / "saved")), DataConfig())
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded.pad_token == loaded.eos_token == EOS  # pad falls back to EOS
    assert loaded.encode(TRAIN_DOCS[0]) == tokenizer.encode(TRAIN_DOCS[0])


def test_unloadable_tokenizer_path_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^tokenizer\.path: .*local directory"):
        build_tokenizer(TokenizerConfig(path="modelzoo-tests/no-such-tokenizer"), DataConfig())


def test_too_small_vocabulary_is_rejected(data: DataConfig) -> None:
    with pytest.raises(ConfigError, match=r"^tokenizer\.vocab_size: 100 is below 257"):
        build_tokenizer(TokenizerConfig(vocab_size=100), data)


# ---- corpus: packing and caching ---------------------------------------------------------------------------


def test_blocks_concatenate_back_to_the_documents(data: DataConfig, tokenizer: PreTrainedTokenizerFast) -> None:
    corpus = load_corpus(data, tokenizer)
    for blocks, docs, count in (
        (corpus.train, TRAIN_DOCS, corpus.train_tokens),
        (corpus.validation, VALIDATION_DOCS, corpus.validation_tokens),
    ):
        stream = encode_documents(tokenizer, docs)
        assert count == len(stream)
        assert blocks.shape == (len(stream) // (SEQ_LEN + 1), SEQ_LEN + 1)
        assert blocks.dtype == np.uint16
        assert blocks.ravel().tolist() == stream[: blocks.size]


def test_json_lines_and_blank_lines_give_the_same_blocks(
    data: DataConfig, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    records = [json.dumps({"pmid": i, "abstract": doc}) for i, doc in enumerate(TRAIN_DOCS)]
    records.insert(3, "")
    jsonl = write_lines(tmp_path / "train.jsonl", records)
    blank = write_lines(tmp_path / "blank.txt", [*TRAIN_DOCS[:5], "", "   ", *TRAIN_DOCS[5:]])
    expected = load_corpus(data, tokenizer).train
    from_json = data_config(tmp_path, [jsonl], data.validation_files, text_field="abstract")
    from_blank = data_config(tmp_path, [blank], data.validation_files)
    for cfg in (from_json, from_blank):
        np.testing.assert_array_equal(load_corpus(cfg, tokenizer).train, expected)


def test_second_load_hits_the_cache(
    data: DataConfig, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_corpus(data, tokenizer)
    directory = Path(data.cache_dir) / "corpus" / first.fingerprint
    assert sorted(path.name for path in directory.iterdir()) == ["meta.json", "train.npy", "validation.npy"]
    assert [path.name for path in directory.parent.iterdir()] == [first.fingerprint]  # no temporary left over

    monkeypatch.setattr(datasets.Dataset, "map", lambda *args, **kwargs: pytest.fail("re-tokenised"))
    second = load_corpus(data, tokenizer)
    assert second.fingerprint == first.fingerprint
    assert (second.train_tokens, second.validation_tokens) == (first.train_tokens, first.validation_tokens)
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.validation, first.validation)


def test_corpus_fingerprint_follows_content_seq_len_and_tokenizer(
    data: DataConfig, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    base = corpus_fingerprint(data, tokenizer)
    moved = tmp_path / "moved.txt.gz"
    moved.write_bytes(Path(data.train_files[0]).read_bytes())
    assert corpus_fingerprint(data_config(tmp_path, [str(moved)], data.validation_files), tokenizer) == base
    edited = write_lines(tmp_path / "edited.txt.gz", [*TRAIN_DOCS[:-1], TRAIN_DOCS[-1] + "."])
    assert corpus_fingerprint(data_config(tmp_path, [edited], data.validation_files), tokenizer) != base
    longer = data_config(tmp_path, data.train_files, data.validation_files)
    longer.seq_len = SEQ_LEN + 1
    assert corpus_fingerprint(longer, tokenizer) != base
    other_tokenizer = build_tokenizer(TokenizerConfig(vocab_size=280), data)
    assert corpus_fingerprint(data, other_tokenizer) != base


# ---- corpus: bad data ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "line", "message"),
    [
        ("empty.txt", b"", None, "no documents"),
        ("blank.txt", b"\n  \n\n", None, "no documents"),
        ("latin1.txt", b"fine\nalso fine\nna\xefve caf\xe9\n", 3, "not valid UTF-8"),
        ("latin1.txt.gz", gzip.compress(b"fine\nna\xefve\n"), 2, "not valid UTF-8"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": "b"\n', 2, "invalid JSON"),
        ("array.jsonl", b'["a"]\n', 1, "expected a JSON object"),
        ("no_field.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', 3, "record has no 'text' field"),
        ("number.jsonl", b'{"text": "a"}\n{"text": 7}\n', 2, "'text' is a JSON int, not a string"),
        ("truncated.txt.gz", gzip.compress("\n".join(TRAIN_DOCS).encode())[:200], None, "not a readable gzip file"),
    ],
)
def test_bad_data_names_file_and_line(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, name: str, content: bytes, line: int | None, message: str
) -> None:
    bad = tmp_path / name
    bad.write_bytes(content)
    validation = write_lines(tmp_path / "validation.txt", VALIDATION_DOCS)
    where = re.escape(f"{bad}:{line}: " if line else f"{bad}: ")
    with pytest.raises(DataError, match=f"^{where}.*{re.escape(message)}"):
        load_corpus(data_config(tmp_path, [str(bad)], [validation]), tokenizer)


def test_bad_data_stops_tokenizer_training(tmp_path: Path) -> None:
    bad = tmp_path / "train.txt"
    bad.write_bytes(b"fine\n\xff\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}:2: not valid UTF-8"):
        build_tokenizer(TokenizerConfig(vocab_size=300), data_config(tmp_path, [str(bad)], []))


def test_missing_file_is_named(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(DataError, match=f"^{re.escape(str(missing))}: no such file"):
        load_corpus(data_config(tmp_path, [str(missing)], [str(missing)]), tokenizer)


def test_missing_validation_split_names_the_key(data: DataConfig, tokenizer: PreTrainedTokenizerFast) -> None:
    data.validation_files = []
    with pytest.raises(ConfigError, match=r"^data\.validation_files: "):
        load_corpus(data, tokenizer)


def test_unknown_extension_asks_for_a_format(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    odd = write_lines(tmp_path / "corpus.csv", TRAIN_DOCS)
    with pytest.raises(ConfigError, match=r"^data\.format: cannot tell the format of .*corpus\.csv"):
        load_corpus(data_config(tmp_path, [odd], [odd]), tokenizer)


def test_unreachable_hub_dataset_names_the_key(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = DataConfig(hub_name="modelzoo-tests/no-such-dataset", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^data\.hub_name: cannot load .*local files"):
        load_corpus(cfg, tokenizer)


# ---- unigram baseline ------------------------------------------------------------------------------------------


def test_unigram_loss_matches_a_direct_computation() -> None:
    vocab = 6
    train = np.array([[9, 0, 1, 1], [9, 2, 1, 0]], dtype=np.uint16)  # column 0 is never a target
    validation = np.array([[9, 1, 5, 0]], dtype=np.uint16)
    counts = {0: 2, 1: 3, 2: 1}
    expected = -np.mean([np.log((counts.get(t, 0) + 1) / (6 + vocab)) for t in (1, 5, 0)])
    assert unigram_loss(train, validation, vocab) == pytest.approx(expected)


# ---- loader ----------------------------------------------------------------------------------------------------


def make_blocks(count: int, width: int = 5) -> np.ndarray:
    return np.arange(count * width, dtype=np.uint16).reshape(count, width)


def take(loader: BlockLoader, count: int) -> list[torch.Tensor]:
    return [loader.next_batch()[0] for _ in range(count)]


def test_loader_batches_are_shifted_pairs_and_deterministic() -> None:
    blocks = make_blocks(10)
    x, y = BlockLoader(blocks, batch_size=3, seed=0).next_batch()
    assert x.shape == y.shape == (3, 4) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    first, second = (take(BlockLoader(blocks, batch_size=3, seed=0), 9) for _ in range(2))
    assert torch.equal(torch.cat(first), torch.cat(second))
    assert not torch.equal(torch.cat(first), torch.cat(take(BlockLoader(blocks, batch_size=3, seed=1), 9)))
    epoch = torch.cat(first[:3])[:, 0].tolist()  # 3 batches of 3 per epoch: 9 distinct blocks
    assert len(set(epoch)) == 9


@pytest.mark.parametrize("consumed", [2, 3, 4])  # mid-epoch, at the epoch boundary, into the next epoch
def test_loader_resumes_exactly(consumed: int) -> None:
    blocks = make_blocks(10)
    original = BlockLoader(blocks, batch_size=3, seed=7)
    take(original, consumed)
    restored = BlockLoader(blocks, batch_size=3, seed=7)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert torch.equal(torch.cat(take(original, 5)), torch.cat(take(restored, 5)))


def test_ranks_take_disjoint_shares_of_an_epoch() -> None:
    blocks = make_blocks(20)
    loaders = [BlockLoader(blocks, batch_size=2, seed=3, rank=r, world_size=3) for r in range(3)]
    assert {loader.batches_per_epoch for loader in loaders} == {3}
    shares = [set(torch.cat(take(loader, 3))[:, 0].tolist()) for loader in loaders]
    assert sum(map(len, shares)) == len(set().union(*shares)) == 18


def test_loader_without_a_full_batch_names_the_keys() -> None:
    with pytest.raises(DataError, match=r"^train\.txt: 3 blocks .*task\.micro_batch_size=4.*data\.seq_len"):
        BlockLoader(make_blocks(3), batch_size=4, seed=0, source="train.txt")


def test_iter_eval_is_sequential_and_complete() -> None:
    blocks = make_blocks(7)
    batches = list(iter_eval(blocks, batch_size=3))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 1]
    assert torch.cat([x for x, _ in batches]).tolist() == blocks[:, :-1].tolist()
    assert len(list(iter_eval(blocks, batch_size=3, max_batches=2))) == 2


# ---- the shipped sample --------------------------------------------------------------------------------------


def test_shipped_sample_matches_its_readme() -> None:
    readme = (SAMPLE / "README.md").read_text()
    assert (SAMPLE / "NOTICE.txt").is_file()
    for name in ("train.txt.gz", "validation.txt.gz"):
        stated = int(re.search(rf"`{re.escape(name)}`: ([\d,]+) documents", readme).group(1).replace(",", ""))
        with gzip.open(SAMPLE / name, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert len(lines) == stated and all(line.strip() for line in lines)
    assert sum(path.stat().st_size for path in SAMPLE.iterdir()) < 1.5e6


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")
def test_sample_rebuilds_byte_identically(tmp_path: Path) -> None:
    script = REPO / "scripts" / "build_pubmed_sample.py"
    source = SHARED / "data" / "pubmed_abstracts"
    done = run_command([sys.executable, script, "--source", source, "--output", str(tmp_path)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in SAMPLE.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name

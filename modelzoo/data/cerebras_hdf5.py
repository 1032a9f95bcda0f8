"""Cerebras Model Zoo GPT language-modelling HDF5 shards, read and written.

The layout is the one the Model Zoo's preprocessing writes (`data_preprocessor.save_buffer_to_hdf5`) and
`GptHDF5MapDataProcessor` reads in its "sample" form: each `*.h5` file holds a dataset `data` of shape
(n_examples, 3, max_seq_length), int32, rows `input_ids`, `attention_mask` (a loss mask) and `labels`
(`input_ids` shifted left by one), chunked one sample per chunk and gzip-compressed, with the count in
the file attribute `n_examples`; the directory's `data_params.json` records the `processing` parameters
(`max_seq_length`, the tokenizer); ours also hold the tokenizer itself, in `save_pretrained` form. One of our
blocks of `seq_len + 1` tokens is exactly one sample:
`input_ids = block[:-1]`, `labels = block[1:]`, mask all ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from modelzoo.atomic import fsync, write_text_atomically
from modelzoo.data.shards import ShardedBlocks
from modelzoo.errors import DataError

DATASET = "data"
PARAMS = "data_params.json"
READ_ROWS = 1024
FILE = "output_chunk_0_{:05d}.h5"  # the Model Zoo writer's name for process 0's chunks


def declared_tokenizer(path: str) -> str | None:
    """The tokenizer the `data_params.json` beside `path` names (ours by sha256, the Model Zoo's by name)."""
    params = Path(path).parent / PARAMS
    if not params.is_file():
        return None
    processing = json.loads(params.read_text()).get("processing", {})
    for key in ("modelzoo_tokenizer_sha256", "huggingface_tokenizer", "custom_tokenizer"):
        if processing.get(key):
            return f"{key}={processing[key]}"
    return None


def check_file(path: str, seq_len: int) -> int:
    """The number of samples in one file, after checking its dataset's shape against `data.seq_len`."""
    if not Path(path).is_file():
        raise DataError(path, "no such file; check data.train_files / data.validation_files (relative to the cwd)")
    try:
        with h5py.File(path, "r") as f:
            if DATASET not in f:
                raise DataError(path, f"no dataset {DATASET!r} (keys: {', '.join(f)}); not a Model Zoo GPT LM shard")
            shape = f[DATASET].shape
    except OSError as exc:
        raise DataError(path, f"not a readable HDF5 file ({exc})") from exc
    if len(shape) != 3 or shape[1] != 3:
        raise DataError(path, f"{DATASET!r} has shape {shape}; expected (n_examples, 3, max_seq_length)")
    if shape[2] != seq_len:
        raise DataError(path, f"max_seq_length is {shape[2]} but data.seq_len={seq_len}; set data.seq_len={shape[2]}")
    return shape[0]


def describe(exc: OSError) -> str:
    """h5py's error text without the C library's call stack."""
    return str(exc).splitlines()[0]


def read_blocks(path: str, seq_len: int, vocab_size: int) -> Iterator[np.ndarray]:
    """The samples of one file as our blocks (rows of `seq_len + 1` tokens), `READ_ROWS` samples at a time.

    Samples with padding (a loss mask that is not all ones) are skipped: our loss has no mask, so their pad
    tokens would be trained on.

    Raises:
        DataError: labels that are not the inputs shifted by one, or ids beyond the tokenizer's vocabulary,
            naming the file and sample.
    """
    check_file(path, seq_len)
    with h5py.File(path, "r") as f:
        data = f[DATASET]
        for start in range(0, data.shape[0], READ_ROWS):
            try:
                rows = np.asarray(data[start : start + READ_ROWS], dtype=np.int64)  # (n, 3, seq_len)
            except OSError as exc:
                end = min(start + READ_ROWS, data.shape[0]) - 1
                raise DataError(
                    path,
                    f"samples {start}-{end} of {DATASET!r} cannot be decoded ({describe(exc)}): the file is damaged; "
                    "write it again (or leave it out of data.train_files / data.validation_files)",
                ) from exc
            inputs, mask, labels = rows[:, 0], rows[:, 1], rows[:, 2]
            full = (mask == 1).all(axis=1)
            shifted = (labels[:, :-1] == inputs[:, 1:]).all(axis=1)
            if not (shifted | ~full).all():
                bad = start + int(np.flatnonzero(~shifted & full)[0])
                raise DataError(path, f"sample {bad}: labels are not input_ids shifted by one (not a GPT LM shard)")
            blocks = np.concatenate([inputs, labels[:, -1:]], axis=1)[full]
            if blocks.size and (blocks.min() < 0 or blocks.max() >= vocab_size):
                raise DataError(
                    path, f"token ids span [{blocks.min()}, {blocks.max()}], outside the tokenizer's {vocab_size} ids"
                )
            yield blocks


def write_hdf5(blocks: ShardedBlocks, directory: Path, samples_per_file: int, processing: dict[str, Any]) -> list[Path]:
    """Write `blocks` as Model Zoo GPT LM shards (see the module docstring) plus `data_params.json`.

    Each file is written under a temporary name and renamed, so a directory never shows a half-written one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    seq_len = blocks.width - 1
    written = []
    for number, start in enumerate(range(0, len(blocks), samples_per_file)):
        chunk = np.asarray(blocks[start : start + samples_per_file], dtype=np.int32)
        data = np.stack([chunk[:, :-1], np.ones_like(chunk[:, :-1]), chunk[:, 1:]], axis=1)  # (n, 3, seq_len)
        path = directory / FILE.format(number)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with h5py.File(tmp, "w") as f:
            f.create_dataset(DATASET, data=data, dtype="i4", chunks=(1, 3, seq_len), compression="gzip")
            f.attrs["n_examples"] = len(data)
        fsync(tmp)
        os.replace(tmp, path)
        written.append(path)
    params = {
        "processing": {"max_seq_length": seq_len, **processing},
        "post-process": {"n_examples": len(blocks), "n_files": len(written)},
    }
    write_text_atomically(directory / PARAMS, json.dumps(params, indent=2))
    return written

"""Reading labelled records from JSON Lines and JSON files, keeping each record's line for error messages."""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelzoo.errors import ConfigError, DataError


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line of a JSON Lines file.

    Raises:
        DataError: a line that is not a JSON object, named by file and line.
    """
    with path.open(encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"not valid JSON ({exc.msg}); each line must be one JSON object", line) from exc
            if not isinstance(record, dict):
                raise DataError(path, f"a JSON {type(record).__name__}, not an object; write one object per line", line)
            yield line, record


def read_json_object(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, key, value) for every top-level entry of a JSON object file such as `ori_pqal.json`.

    The line is where the key starts, found by decoding the object one entry at a time.

    Raises:
        DataError: the file is not a JSON object, named by file and line.
    """
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def expect(pos: int, char: str) -> int:
        if not text.startswith(char, pos):
            raise DataError(path, f"expected {char!r} at column {pos - text.rfind(chr(10), 0, pos)}", line_of(pos))
        return skip(pos + 1)

    newlines = [m.start() for m in re.finditer("\n", text)]

    def line_of(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    pos = expect(skip(0), "{")
    while not text.startswith("}", pos):
        start = pos
        try:
            key, pos = decoder.raw_decode(text, pos)
            pos = expect(skip(pos), ":")
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"not valid JSON ({exc.msg})", line_of(exc.pos)) from exc
        yield line_of(start), key, value
        pos = skip(pos)
        if not text.startswith("}", pos):
            pos = expect(pos, ",")


def field(record: dict[str, Any], name: str, kind: type | tuple[type, ...], path: Path, line: int) -> Any:
    """`record[name]`, checked to be present and of type `kind`.

    Raises:
        DataError: the field is missing or has the wrong type, named by file and line.
    """
    if name not in record:
        raise DataError(path, f"record has no {name!r} field (it has: {', '.join(sorted(record))})", line)
    value = record[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(path, f"field {name!r} is a {type(value).__name__}, expected {expected}", line)
    return value


def split_name(split: str, allowed: tuple[str, ...]) -> str:
    """`split` if it is one of `allowed`.

    Raises:
        ConfigError: an unknown split name.
    """
    if split not in allowed:
        raise ConfigError("split", f"unknown split {split!r}", allowed)
    return split

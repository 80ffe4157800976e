"""Input files as text lines and JSON values, each with its place in the file (line, or record of an array).

Line formats are read lazily as bytes and decoded one line at a time, so a line of invalid UTF-8 (or one
holding a NUL byte) doesn't hide the lines after it: it becomes a `BadLine` or a `Problem` at its line.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .jsonparse import parse_json
from .problems import Problem


@dataclass(frozen=True)
class BadLine:
    """A line that is not UTF-8 text: why, and the line with the bad bytes replaced (for the CSV reader)."""

    message: str
    text: str


def read_lines(path: Path, keepends: bool = False) -> Iterator[tuple[int, str | BadLine]]:
    """(1-based line number, text) per line; a BadLine where a line isn't UTF-8 or holds a NUL byte."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # Excel and Notepad write one
            try:
                text = raw.decode("utf-8")
                problem = _nul(raw)
            except UnicodeDecodeError as err:
                text, problem = raw.decode("utf-8", errors="replace"), _bad_utf8(err, number == 1)
            if not keepends:
                text = text.rstrip("\r\n")
            yield number, BadLine(problem, text.replace("\0", "\ufffd")) if problem else text


def _bad_utf8(err: UnicodeDecodeError, first_line: bool = False) -> str:
    if first_line and err.object.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
    return f"invalid UTF-8 (byte 0x{err.object[err.start]:02x} at column {err.start + 1})"


def _nul(raw: bytes) -> str | None:
    # Python's csv and str accept NUL as data, so without this a UTF-16 file (ASCII with a NUL after each
    # character) would be read as garbage text, or fail later with a baffling "no 'text' column".
    at = raw.find(b"\0")
    return None if at < 0 else (f"NUL byte at column {at + 1}: text files have none (is this file UTF-16 "
                                "or binary? tunesmith reads UTF-8)")


def _is_array(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(1024).removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["


def _invalid_json(path: Path, err: json.JSONDecodeError, line: int | None = None) -> Problem:
    return Problem(str(path), line or err.lineno, None, f"invalid JSON: {err.msg} (column {err.colno})")


def _jsonl_values(path: Path) -> Iterator[Problem | tuple[int, str, Any]]:
    for number, text in read_lines(path):
        if isinstance(text, BadLine):
            yield Problem(str(path), number, None, text.message)
        elif text.strip():
            try:
                yield number, "line", parse_json(text)
            except json.JSONDecodeError as err:
                yield _invalid_json(path, err, number)


def _array_values(path: Path) -> Iterator[Problem | tuple[int, str, Any]]:
    # A JSON array can only be parsed whole; its problems are placed by record number, not line.
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        yield Problem(str(path), data.count(b"\n", 0, err.start) + 1, None, _bad_utf8(err))
        return
    nul = data.find(b"\0")
    if nul >= 0:
        start = data.rfind(b"\n", 0, nul) + 1
        yield Problem(str(path), data.count(b"\n", 0, nul) + 1, None, _nul(data[start:nul + 1]))
        return
    try:
        values = parse_json(text)
    except json.JSONDecodeError as err:
        yield _invalid_json(path, err)
        return
    yield from ((number, "record", value) for number, value in enumerate(values, 1))


def json_values(path: Path) -> Iterator[Problem | tuple[int, str, Any]]:
    """(number, unit, value) per JSON value of a .json/.jsonl file, or a Problem where one can't be read."""
    return _array_values(path) if _is_array(path) else _jsonl_values(path)


def first_object(path: Path) -> tuple[int, str, dict] | None:
    """The first JSON object of a .json/.jsonl file, with its place; lines that don't parse are skipped so
    that one broken line doesn't stop detection (the reader reports it)."""
    if _is_array(path):
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
        start = text.index("[") + 1
        start += len(text[start:]) - len(text[start:].lstrip())
        try:
            value, _ = json.JSONDecoder().raw_decode(text, start)
        except (ValueError, RecursionError):  # see parse_json; the reader reports it with its place
            return None
        return (1, "record", value) if isinstance(value, dict) else None
    return next((item for item in _jsonl_values(path)
                 if isinstance(item, tuple) and isinstance(item[2], dict)), None)


def has_content(path: Path) -> bool:
    with path.open("rb") as f:
        return any(chunk.removeprefix(codecs.BOM_UTF8).strip() for chunk in iter(lambda: f.read(1 << 16), b""))

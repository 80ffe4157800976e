"""File readers behind `tunesmith.data.formats`: each input format becomes a stream of internal records.

A reader never raises for bad data. It yields either a valid record (a plain dict in one of the shapes
documented in `formats`) or a `Problem` naming file, line and field, then moves on, so one pass over a
file finds every problem. Line formats are read lazily as bytes and decoded one line at a time, so a
line of invalid UTF-8 doesn't hide the lines after it.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

JSON_SUFFIXES = (".json", ".jsonl")
CSV_SUFFIXES = (".csv", ".tsv")
CONLL_SUFFIXES = (".conll", ".iob", ".bio", ".bioes")
ROLES = ("system", "user", "assistant")
# ShareGPT dumps name the speaker after the product that wrote the turn.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system"}
# IOB1/IOB2 use B-/I-, BIOES adds E-/S-, and BILOU spells those two L-/U-.
_TAG = re.compile(r"O|[BIESLU]-\S+")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file, at a place a user can find in an editor."""

    file: str
    line: int | None
    field: str | None
    message: str
    unit: str = "line"  # "record" in a JSON array file, where `line` is the 1-based record number

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}" if self.unit == "line" else f":record {self.line}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


@dataclass(frozen=True)
class ReadOptions:
    text_column: str = "text"  # CSV/TSV only
    label_column: str = "label"
    delimiter: str | None = None  # None: tab for .tsv, comma otherwise


Item = Union[dict, Problem]
Issues = list  # (field, message) pairs found in one JSON record


@dataclass(frozen=True)
class Reader:
    """A registered format: the kind of record it yields and the function that reads a file."""

    kind: str
    read: Callable[[Path, ReadOptions], Iterator[Item]]

    def __call__(self, path, options: ReadOptions = ReadOptions()) -> Iterator[Item]:
        return self.read(Path(path), options)


# ---------------------------------------------------------------------------------------------------------
# sources: lines and JSON values, each with its place in the file
# ---------------------------------------------------------------------------------------------------------

def _lines(path: Path, keepends: bool = False) -> Iterator[tuple[int, str | UnicodeDecodeError]]:
    """(1-based line number, text) per line; the text is the decode error where a line isn't UTF-8."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # Excel and Notepad write one
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, err
                continue
            yield number, text if keepends else text.rstrip("\r\n")


def _bad_utf8(path: Path, number: int, err: UnicodeDecodeError) -> Problem:
    return Problem(str(path), number, None,
                   f"invalid UTF-8 (byte 0x{err.object[err.start]:02x} at column {err.start + 1})")


def _is_array(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(1024).removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["


def _jsonl_values(path: Path) -> Iterator[Problem | tuple[int, str, Any]]:
    for number, text in _lines(path):
        if isinstance(text, UnicodeDecodeError):
            yield _bad_utf8(path, number, text)
        elif text.strip():
            try:
                yield number, "line", json.loads(text)
            except json.JSONDecodeError as err:
                yield Problem(str(path), number, None, f"invalid JSON: {err.msg} (column {err.colno})")


def _array_values(path: Path) -> Iterator[Problem | tuple[int, str, Any]]:
    # A JSON array can only be parsed whole; its problems are placed by record number, not line.
    data = path.read_bytes()
    try:
        values = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        yield _bad_utf8(path, data.count(b"\n", 0, err.start) + 1, err)
        return
    except json.JSONDecodeError as err:
        yield Problem(str(path), err.lineno, None, f"invalid JSON: {err.msg} (column {err.colno})")
        return
    yield from ((number, "record", value) for number, value in enumerate(values, 1))


def first_object(path: Path) -> tuple[int, str, dict] | None:
    """The first JSON object of a .json/.jsonl file, with its place; lines that don't parse are skipped so
    that one broken line doesn't stop detection (the reader reports it)."""
    if _is_array(path):
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
        start = text.index("[") + 1
        start += len(text[start:]) - len(text[start:].lstrip())
        try:
            value, _ = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            return None
        return (1, "record", value) if isinstance(value, dict) else None
    return next((item for item in _jsonl_values(path)
                 if isinstance(item, tuple) and isinstance(item[2], dict)), None)


def has_content(path: Path) -> bool:
    with path.open("rb") as f:
        return any(chunk.removeprefix(codecs.BOM_UTF8).strip() for chunk in iter(lambda: f.read(1 << 16), b""))


# ---------------------------------------------------------------------------------------------------------
# JSON record formats: one `parse(obj, issues) -> record` each, shared sources above
# ---------------------------------------------------------------------------------------------------------

def _json_reader(parse: Callable[[dict, Issues], dict | None]) -> Callable[[Path, ReadOptions], Iterator[Item]]:
    def read(path: Path, options: ReadOptions) -> Iterator[Item]:
        for item in _array_values(path) if _is_array(path) else _jsonl_values(path):
            if isinstance(item, Problem):
                yield item
                continue
            number, unit, obj = item
            if not isinstance(obj, dict):
                yield Problem(str(path), number, None, f"record must be a JSON object, got {_type(obj)}", unit)
                continue
            issues: Issues = []
            record = parse(obj, issues)
            if issues:
                yield from (Problem(str(path), number, field, message, unit) for field, message in issues)
            else:
                yield record
    return read


def _type(value: Any) -> str:
    """The JSON name of a value's type, for messages about JSON files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(type(value),
                                                                                          type(value).__name__)


def _text(obj: dict, key: str, issues: Issues, where: str = "", *, optional: bool = False,
          allow_empty: bool = False, empty: str | None = None) -> str | None:
    """obj[key] if it is a string (non-blank unless allow_empty), else None with an issue; null = missing."""
    field = f"{where}.{key}" if where else key
    value = obj.get(key)
    if value is None:
        if not optional:
            issues.append((field, f"missing {key}"))
        return None
    if not isinstance(value, str):
        issues.append((field, f"{key} must be a string, got {_type(value)}"))
        return None
    if not allow_empty and not value.strip():
        issues.append((field, empty or f"empty {key}"))
        return None
    return value


def _list(obj: dict, key: str, issues: Issues) -> list | None:
    value = obj.get(key)
    if value is None:
        issues.append((key, f"missing {key}"))
    elif not isinstance(value, list):
        issues.append((key, f"{key} must be a list, got {_type(value)}"))
    elif not value:
        issues.append((key, f"{key} is empty"))
    else:
        return value
    return None


def _message(m: Any, where: str, issues: Issues) -> dict | None:
    if not isinstance(m, dict):
        issues.append((where, f"message must be an object, got {_type(m)}"))
        return None
    role = m.get("role")
    if role is None:
        issues.append((f"{where}.role", "missing role"))
    elif role not in ROLES:
        issues.append((f"{where}.role", f"unknown role {role!r} (expected system, user or assistant)"))
    message = {"role": role, "content": _text(m, "content", issues, where, empty="empty message")}
    if "weight" in m:  # OpenAI's fine-tuning format: 0 = shown to the model but not learned
        weight = message["weight"] = m["weight"]
        if role != "assistant":
            issues.append((f"{where}.weight", f"weight is only allowed on assistant messages, not {role!r}"))
        elif type(weight) is not int or weight not in (0, 1):
            issues.append((f"{where}.weight", f"weight must be 0 or 1, got {json.dumps(weight)}"))
    return message


def _require_learnable(messages: list, field: str, issues: Issues) -> None:
    if not issues and not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        issues.append((field, "no assistant turn to learn from"))


def _system(obj: dict, issues: Issues) -> list[dict]:
    system = _text(obj, "system", issues, optional=True, allow_empty=True)
    return [{"role": "system", "content": system}] if system and system.strip() else []


def _parse_chat(obj: dict, issues: Issues) -> dict | None:
    messages = _list(obj, "messages", issues)
    if messages is None:
        return None
    out = [_message(m, f"messages[{i}]", issues) for i, m in enumerate(messages)]
    _require_learnable(out, "messages", issues)
    return {"messages": out}


def _parse_completion(obj: dict, issues: Issues) -> dict:
    return {"prompt": _text(obj, "prompt", issues, allow_empty=True), "completion": _text(obj, "completion", issues)}


def _history(obj: dict, issues: Issues) -> list[dict]:
    """LLaMA-Factory's alpaca `history`: earlier turns as [user, assistant] pairs."""
    history = obj.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        issues.append(("history", f"history must be a list, got {_type(history)}"))
        return []
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) and s.strip() for s in pair)):
            issues.append((f"history[{i}]", "history turn must be a [user, assistant] pair of non-empty strings"))
            continue
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _parse_alpaca(obj: dict, issues: Issues) -> dict:
    instruction = _text(obj, "instruction", issues)
    extra = _text(obj, "input", issues, optional=True, allow_empty=True)
    output = _text(obj, "output", issues)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return {"messages": _system(obj, issues) + _history(obj, issues)
            + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def _parse_sharegpt(obj: dict, issues: Issues) -> dict | None:
    turns = _list(obj, "conversations", issues)
    messages = _system(obj, issues)
    if turns is None:
        return None
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            issues.append((where, f"turn must be an object, got {_type(turn)}"))
            continue
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if speaker is None:
            issues.append((f"{where}.from", "missing from"))
        elif role is None:
            issues.append((f"{where}.from", f"unknown speaker {speaker!r} (expected one of "
                                            f"{', '.join(SHAREGPT_ROLES)})"))
        messages.append({"role": role, "content": _text(turn, "value", issues, where, empty="empty message")})
    _require_learnable(messages, "conversations", issues)
    return {"messages": messages}


def _parse_text(obj: dict, issues: Issues) -> dict:
    return {"prompt": "", "completion": _text(obj, "text", issues)}


def _parse_classification(obj: dict, issues: Issues) -> dict:
    text, label = _text(obj, "text", issues), obj.get("label")
    if label is None:
        issues.append(("label", "missing label"))
    elif isinstance(label, bool) or not isinstance(label, (str, int)):
        issues.append(("label", f"label must be a string or an integer, got {_type(label)}"))
    elif not str(label).strip():
        issues.append(("label", "empty label"))
    return {"text": text, "label": str(label)}


def _strings(obj: dict, key: str, issues: Issues) -> list[str] | None:
    values = _list(obj, key, issues)
    bad = next((i for i, v in enumerate(values or []) if not isinstance(v, str)), None)
    if bad is None:
        return values
    hint = " (integer class ids need their tag names, e.g. 'B-PER')" if isinstance(values[bad], int) else ""
    issues.append((f"{key}[{bad}]", f"{key} must be strings, got {_type(values[bad])}{hint}"))
    return None


def _parse_tagging(obj: dict, issues: Issues) -> dict:
    key = "tags" if "tags" in obj else "ner_tags"  # ner_tags: Hugging Face datasets' name for them
    tokens, tags = _strings(obj, "tokens", issues), _strings(obj, key, issues)
    if tokens is not None and tags is not None and len(tokens) != len(tags):
        issues.append((key, f"{len(tags)} tags for {len(tokens)} tokens (they must pair up one to one)"))
    return {"tokens": tokens, "tags": tags}


# ---------------------------------------------------------------------------------------------------------
# line formats: plain text, CSV/TSV, CoNLL
# ---------------------------------------------------------------------------------------------------------

def _read_text(path: Path, options: ReadOptions) -> Iterator[Item]:
    """Paragraphs separated by blank lines, each one completion with an empty prompt; JSONL with `text`."""
    if path.suffix.lower() in JSON_SUFFIXES:
        yield from _json_reader(_parse_text)(path, options)
        return
    lines, broken = [], False
    # A blank line after the last line flushes the last paragraph, so the loop needs no tail case.
    for number, text in itertools.chain(_lines(path), [(0, "")]):
        if isinstance(text, UnicodeDecodeError):
            yield _bad_utf8(path, number, text)
            broken = True
        elif text.strip():
            lines.append(text)
        else:
            if lines and not broken:
                yield {"prompt": "", "completion": "\n".join(lines)}
            lines, broken = [], False


def _read_conll(path: Path, options: ReadOptions) -> Iterator[Item]:
    """`token ... tag` per line (token first, tag last, so 4-column CoNLL-2003 works), blank between sentences."""
    tokens, tags, broken = [], [], False
    for number, text in itertools.chain(_lines(path), [(0, "")]):  # the extra blank flushes the last sentence
        if isinstance(text, UnicodeDecodeError):
            yield _bad_utf8(path, number, text)
            broken = True
            continue
        columns = text.split()
        if not columns:
            if tokens and not broken:
                yield {"tokens": tokens, "tags": tags}
            tokens, tags, broken = [], [], False
        elif columns[0] == "-DOCSTART-":
            continue
        elif len(columns) == 1:
            yield Problem(str(path), number, None, f"expected 'token tag' but found one column {columns[0]!r}")
            broken = True
        elif not _TAG.fullmatch(columns[-1]):
            yield Problem(str(path), number, None, f"tag {columns[-1]!r} is not IOB/BIOES-shaped (expected O, "
                                                   "or B-, I-, E-, S-, L- or U- and a type, e.g. B-PER)")
            broken = True
        else:
            tokens.append(columns[0])
            tags.append(columns[-1])


def _csv_lines(path: Path, bad: list) -> Iterator[str]:
    """Lines for the csv module; an undecodable line is noted in `bad` (and fed on, replaced) so that
    the row it belongs to can be reported with the right line number."""
    for number, text in _lines(path, keepends=True):
        if isinstance(text, UnicodeDecodeError):
            bad.append(_bad_utf8(path, number, text))
            text = text.object.decode("utf-8", errors="replace")
        yield text


def _rows(path: Path, options: ReadOptions) -> Iterator[Problem | tuple[int, list[str]]]:
    """(first line, fields) per CSV row, header included; line numbers count the physical lines, so they
    stay right across quoted fields that span lines."""
    bad: list[Problem] = []
    delimiter = options.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    reader = csv.reader(_csv_lines(path, bad), delimiter=delimiter)
    end = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:  # e.g. a NUL byte or a field over the csv module's size limit
            yield Problem(str(path), reader.line_num, None, f"unreadable CSV: {err}")
            return
        start, end = end + 1, reader.line_num
        if bad:
            yield from bad
            bad.clear()
        elif row:
            yield start, row


def _read_csv(path: Path, options: ReadOptions) -> Iterator[Item]:
    rows = _rows(path, options)
    first = next(rows, None)
    if first is None:
        return
    if isinstance(first, Problem):  # the header itself is unreadable
        yield first
        return
    header = [name.strip() for name in first[1]]
    wanted = (options.text_column, options.label_column)
    missing = [name for name in wanted if name not in header]
    if missing:
        yield Problem(str(path), first[0], None,
                      f"the header has no {' or '.join(map(repr, missing))} column (found: {', '.join(header)}); "
                      "choose columns with text_column=/label_column= (--text-column/--label-column)")
        return
    text_at, label_at = (header.index(name) for name in wanted)
    for item in rows:
        if isinstance(item, Problem):
            yield item
            continue
        number, row = item
        if len(row) != len(header):
            yield Problem(str(path), number, None, f"row has {len(row)} fields but the header has {len(header)}")
            continue
        problems = [Problem(str(path), number, column, f"empty {name}")
                    for column, name, value in ((wanted[0], "text", row[text_at]), (wanted[1], "label", row[label_at]))
                    if not value.strip()]
        yield from problems or [{"text": row[text_at], "label": row[label_at]}]


# Plain dict, defined once: the CLI's --format choices and detection both come from here.
FORMATS: dict[str, Reader] = {
    "openai-chat": Reader("chat", _json_reader(_parse_chat)),
    "completion": Reader("completion", _json_reader(_parse_completion)),
    "alpaca": Reader("chat", _json_reader(_parse_alpaca)),
    "sharegpt": Reader("chat", _json_reader(_parse_sharegpt)),
    "text": Reader("completion", _read_text),
    "csv": Reader("classification", _read_csv),
    "conll": Reader("tagging", _read_conll),
    "classification-jsonl": Reader("classification", _json_reader(_parse_classification)),
    "tagging-jsonl": Reader("tagging", _json_reader(_parse_tagging)),
}

"""File readers behind `tunesmith.data.formats`: each input format becomes a stream of internal records.

A reader never raises for bad data. It yields either a valid record (a plain dict in one of the shapes
documented in `formats`) or a `Problem` naming file, line and field, then moves on, so one pass over a
file finds every problem. Line formats are read lazily as bytes and decoded one line at a time, so a
line of invalid UTF-8 doesn't hide the lines after it.

Hostile input is bad data too: nesting deeper than Python's recursion limit, integers longer than its
int-to-str limit, NUL bytes and unpaired surrogate escapes each become a Problem at their line, never a
traceback (see `parse_json`).
"""

from __future__ import annotations

import codecs
import csv
import functools
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from .tools import function_of

JSON_SUFFIXES = (".json", ".jsonl")
CSV_SUFFIXES = (".csv", ".tsv")
CONLL_SUFFIXES = (".conll", ".iob", ".bio", ".bioes")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT dumps name the speaker after the product that wrote the turn; LLaMA-Factory's tool format adds
# `function_call` (the assistant's calls, as JSON) and `observation` (a tool's result).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool"}
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
    warning: bool = False  # allowed but suspect (e.g. an empty system message): the record is still read

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


class Issues(list):
    """The (field, message) errors found in one JSON record; `warnings` holds the pairs that don't reject it."""

    def __init__(self):
        super().__init__()
        self.warnings: list[tuple[str, str]] = []


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

@dataclass(frozen=True)
class _BadLine:
    """A line that is not UTF-8 text: why, and the line with the bad bytes replaced (for the CSV reader)."""

    message: str
    text: str


def _lines(path: Path, keepends: bool = False) -> Iterator[tuple[int, str | _BadLine]]:
    """(1-based line number, text) per line; a _BadLine where a line isn't UTF-8 or holds a NUL byte."""
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
            yield number, _BadLine(problem, text.replace("\0", "\ufffd")) if problem else text


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


# Skips a JSON string whole (so brackets and digits inside it don't count), else one bracket or number.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|-?\d+(\.\d+)?([eE][-+]?\d+)?')
# Backslashes before a \uD800-\uDFFF escape: an odd run is the escape itself, an even one is "\\" + text.
_SURROGATE_ESCAPE = re.compile(r"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(text: str) -> Any:
    """json.loads, except that everything Python's json module cannot (or should not) read is a
    json.JSONDecodeError with a position: nesting beyond the recursion limit (a RecursionError from json),
    an integer over sys.get_int_max_str_digits() digits (a ValueError), and an unpaired surrogate escape
    such as "\\ud83d" (accepted by json, but not Unicode: writing it as UTF-8 fails later)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        depth, at = _deepest(text)
        raise json.JSONDecodeError(f"arrays and objects nested {depth} deep, more than Python's json module "
                                   "can read", text, at) from None
    except ValueError as err:  # an integer over Python's int max str digits
        raise json.JSONDecodeError(*_long_integer(text, err)) from None
    # Only an escape can make a surrogate (raw UTF-8 can't encode one), and json joins every proper pair.
    if "\\u" in text and _has_surrogate(value):
        at, code = _lone_surrogate(text)
        raise json.JSONDecodeError(f"unpaired surrogate escape \\u{code:04x} is not a Unicode character (half of "
                                   "an emoji cut in two?)", text, at)
    return value


def _deepest(text: str) -> tuple[int, int]:
    """The greatest nesting depth in `text` and the offset of the first bracket that reaches it."""
    depth = deepest = at = 0
    for match in _JSON_TOKEN.finditer(text):
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, match.start()
        elif char in "]}":
            depth -= 1
    return deepest, at


def _long_integer(text: str, err: ValueError) -> tuple[str, str, int]:
    limit = sys.get_int_max_str_digits()
    for match in _JSON_TOKEN.finditer(text):
        digits = match.group().lstrip("-")
        # json hands only integers to int(); a fraction or exponent makes it a float, which has no limit.
        if digits[:1].isdigit() and not (match.group(1) or match.group(2)) and len(digits) > limit:
            return (f"a {len(digits)}-digit integer, over Python's limit of {limit} digits (write it as a string)",
                    text, match.start())
    return str(err), text, 0


def _has_surrogate(value: Any) -> bool:
    stack = [value]  # a loop, not recursion: the value may be nested nearly as deep as the recursion limit
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack += item
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return False


def _lone_surrogate(text: str) -> tuple[int, int]:
    """Offset and code of the first unpaired surrogate escape in JSON text that holds one."""
    # Outside a string a backslash is a syntax error json has already raised, so every escape found here
    # is inside a string. json pairs a high surrogate with a low one that follows it; any other is alone.
    escapes = [(m.start(2) - 2, int(m.group(2), 16)) for m in _SURROGATE_ESCAPE.finditer(text)
               if len(m.group(1)) % 2]
    i = 0
    while i < len(escapes):
        at, code = escapes[i]
        if code < 0xDC00 and i + 1 < len(escapes) and escapes[i + 1][0] == at + 6 and escapes[i + 1][1] >= 0xDC00:
            i += 2
            continue
        return at, code
    return 0, 0xFFFD  # not reached: _has_surrogate found one


def _invalid_json(path: Path, err: json.JSONDecodeError, line: int | None = None) -> Problem:
    return Problem(str(path), line or err.lineno, None, f"invalid JSON: {err.msg} (column {err.colno})")


def _jsonl_values(path: Path) -> Iterator[Problem | tuple[int, str, Any]]:
    for number, text in _lines(path):
        if isinstance(text, _BadLine):
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


# ---------------------------------------------------------------------------------------------------------
# JSON record formats: one `parse(obj, issues) -> record` each, shared sources above
# ---------------------------------------------------------------------------------------------------------

def _json_reader(parse: Callable[[dict, Issues], dict | None]) -> Callable[[Path, ReadOptions], Iterator[Item]]:
    def read(path: Path, options: ReadOptions) -> Iterator[Item]:
        for item in json_values(path):
            if isinstance(item, Problem):
                yield item
                continue
            number, unit, obj = item
            if not isinstance(obj, dict):
                yield Problem(str(path), number, None, f"record must be a JSON object, got {_type(obj)}", unit)
                continue
            issues = Issues()
            record = parse(obj, issues)
            yield from (Problem(str(path), number, field, message, unit, warning=True)
                        for field, message in issues.warnings)
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


def _show(value: Any) -> str:
    """A value as a message quotes it: a string in quotes, cut short (a line can be megabytes), a list or
    object by its type (its repr could be huge, or nested too deep to print), other scalars as JSON."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:60] + "…")
    return _type(value) if isinstance(value, (list, dict)) else json.dumps(value)


def _text(obj: dict, key: str, issues: Issues, where: str = "", *, optional: bool = False,
          allow_empty: bool = False, empty: str | None = None, warn_empty: str | None = None) -> str | None:
    """obj[key] if it is a string (non-blank unless allow_empty), else None with an issue; null = missing.
    With `warn_empty`, a blank string is kept and that message becomes a warning instead."""
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
        if warn_empty:
            issues.warnings.append((field, warn_empty))
            return value
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


# OpenAI's fine-tuning format accepts empty system and user content, so tunesmith does too, with a warning;
# an empty assistant message is still an error: it is the training target.
_ALLOWED_BUT = {"system": "(allowed, but it renders as an empty system turn; drop the message if none is meant)",
                "user": "(allowed, but the reply that follows then answers nothing)"}
_EMPTY_TURN = {role: f"empty {role} content {why}" for role, why in _ALLOWED_BUT.items()}


# ---------------------------------------------------------------------------------------------------------
# tool calling in chat records: definitions, calls and results, each checked against what came before
# ---------------------------------------------------------------------------------------------------------

def _tools(obj: dict, issues: Issues) -> list[dict] | None:
    """A record's tool definitions as OpenAI's `tools` entries, from `tools` (a list, or LLaMA-Factory's JSON
    text of one) or the older `functions` list of bare function objects; None when it defines none."""
    key = "functions" if obj.get("functions") is not None else "tools"
    if key == "functions" and obj.get("tools") is not None:
        issues.append(("functions", "give tools or functions, not both"))
        return None
    value = obj.get(key)
    if isinstance(value, str) and value.strip():
        try:
            value = parse_json(value)
        except json.JSONDecodeError as err:
            issues.append((key, f"{key} is a string but not JSON: {err.msg} (column {err.colno})"))
            return None
    if not value:  # absent, null, [] or "": no tools, as in a record without the key
        return None
    if not isinstance(value, list):
        issues.append((key, f"{key} must be a list, got {_type(value)}"))
        return None
    tools, names = [], set()
    for i, entry in enumerate(value):
        tool = _tool(entry, f"{key}[{i}]", issues)
        if tool is not None:
            name = tool["function"]["name"]
            if name in names:
                issues.append((f"{key}[{i}]", f"function {_show(name)} is defined twice"))
            names.add(name)
            tools.append(tool)
    return tools


def _tool(entry: Any, where: str, issues: Issues) -> dict | None:
    """One tools entry as `{"type": "function", "function": {...}}`. Also read: a bare function object (the
    `functions` spelling, LLaMA-Factory) and the Responses API's flat `{"type": "function", "name", ...}`."""
    if not isinstance(entry, dict):
        issues.append((where, f"a tools entry must be an object, got {_type(entry)}"))
        return None
    if entry.get("type", "function") != "function":
        issues.append((f"{where}.type", f"only function tools are supported, got type {_show(entry['type'])}"))
        return None
    function, where = ((entry["function"], f"{where}.function") if "function" in entry
                       else ({k: v for k, v in entry.items() if k != "type"}, where))
    if not isinstance(function, dict):
        issues.append((where, f"function must be an object, got {_type(function)}"))
        return None
    name = _text(function, "name", issues, where)
    _text(function, "description", issues, where, optional=True, allow_empty=True)
    if function.get("parameters") is not None:
        _check_parameters(function["parameters"], f"{where}.parameters", issues)
    return None if name is None else {"type": "function", "function": function}


def _check_parameters(parameters: Any, where: str, issues: Issues) -> None:
    if not isinstance(parameters, dict):
        issues.append((where, f"parameters must be a JSON schema object, got {_type(parameters)}"))
        return
    _, error = _schema(json.dumps(parameters, sort_keys=True))
    if error:
        path, message = error
        issues.append((where + _field_path(path), message))
    elif parameters.get("type", "object") != "object":
        issues.append((f"{where}.type", "parameters must describe an object (arguments always are one), got type "
                                        f"{_show(parameters['type'])}"))


@functools.lru_cache(maxsize=1024)
def _schema(text: str) -> tuple[Any, tuple[list, str] | None]:
    """(a validator, None) for a JSON schema given as JSON text, else (None, (path in it, why not)) when its
    own meta-schema rejects it. Cached: a file usually repeats the same tools in every record."""
    from jsonschema import Draft202012Validator, exceptions, validators  # lazily: only tool data needs it

    schema = json.loads(text)
    if not isinstance(schema.get("$schema", ""), str):  # validator_for() would fail on it with a TypeError
        return None, (["$schema"], f"parameters is not a valid JSON schema: $schema must be a string (the URI "
                                   f"of a JSON schema draft), got {_type(schema['$schema'])}")
    cls = validators.validator_for(schema, default=Draft202012Validator)  # $schema picks the draft
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as err:
        return None, (list(err.path), f"parameters is not a valid JSON schema: {err.message}")
    except RecursionError:  # jsonschema recurses per level: about 80 of them, where real schemas have a few
        return None, ([], "parameters nest too deep to be checked as a JSON schema")
    return cls(schema), None


def _schema_break(parameters: dict, arguments: dict) -> str | None:
    """Why `arguments` break the `parameters` schema, or None when they don't (or it can't be checked)."""
    from jsonschema.exceptions import best_match
    from referencing.exceptions import Unresolvable

    validator, _ = _schema(json.dumps(parameters, sort_keys=True))
    if validator is None:  # an invalid schema is already a problem of its own
        return None
    try:
        error = best_match(validator.iter_errors(arguments))
    except (Unresolvable, RecursionError):  # a $ref to another document: nothing offline to check against
        return None
    if error is None:
        return None
    message = error.message if len(error.message) <= 160 else error.message[:160] + "…"
    at = _field_path(error.absolute_path)
    return f"{message} (at arguments{at})" if at else message


def _field_path(parts) -> str:
    """A path inside a JSON value as a field name continues it: ["properties", "city", 0] -> .properties.city[0]"""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _arguments(value: Any, where: str, issues: Issues) -> tuple[str, dict] | None:
    """A call's arguments as (OpenAI's JSON string, the object it holds). An object is taken as it is (TRL and
    LLaMA-Factory write one) and becomes the string."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False), value
    if value is None:
        issues.append((where, "missing arguments (a call without any has \"{}\")"))
        return None
    if not isinstance(value, str):
        issues.append((where, f"arguments must be a JSON object string, got {_type(value)}"))
        return None
    try:
        parsed = parse_json(value)
    except json.JSONDecodeError as err:
        issues.append((where, f"arguments must be a JSON object string, but it is not JSON: {err.msg} "
                              f"(column {err.colno})"))
        return None
    if not isinstance(parsed, dict):
        issues.append((where, f"arguments must be a JSON object string, got a JSON {_type(parsed)}"))
        return None
    return value, parsed


class _Calls:
    """One record's tool calling as it is read, in order: the functions it defines and the calls made so far,
    so that each call is checked against the definitions and each result against the calls before it. Calls
    in a spelling without ids (the older `function_call`, ShareGPT) get `call_0`, `call_1`... in record order."""

    def __init__(self, tools: list[dict] | None):
        self.functions = {function_of(t)["name"]: function_of(t) for t in tools or []}
        self.names: dict[str, str | None] = {}  # call id -> function name
        self.waiting: list[str] = []  # ids of the calls not answered yet, oldest first

    def of_message(self, m: dict, where: str, issues: Issues) -> list[dict] | None:
        """An assistant message's calls: OpenAI's `tool_calls` list, or the older single `function_call`."""
        listed, old = m.get("tool_calls"), m.get("function_call")
        if old is not None:
            if listed:
                issues.append((f"{where}.function_call", "give tool_calls or function_call, not both"))
                return None
            return [self.call(old, None, f"{where}.function_call", issues)]
        if listed is None or listed == []:  # some exporters write an empty list on every assistant message
            return None
        if not isinstance(listed, list):
            issues.append((f"{where}.tool_calls", f"tool_calls must be a list, got {_type(listed)}"))
            return None
        return [self.listed(call, f"{where}.tool_calls[{i}]", issues) for i, call in enumerate(listed)]

    def of_turn(self, turn: dict, where: str, issues: Issues) -> list[dict]:
        """A ShareGPT `function_call` turn's calls: its value is the JSON text of one `{"name", "arguments"}`
        object or of a list of them (parallel calls), as LLaMA-Factory writes them."""
        text = _text(turn, "value", issues, where, empty="empty function call")
        try:
            value = None if text is None else parse_json(text)
        except json.JSONDecodeError as err:
            issues.append((f"{where}.value", f"a function_call value must be JSON: {err.msg} (column {err.colno})"))
            return []
        if isinstance(value, list) and value:
            return [self.call(item, None, f"{where}.value[{j}]", issues) for j, item in enumerate(value)]
        if isinstance(value, dict):
            return [self.call(value, None, f"{where}.value", issues)]
        if text is not None:
            issues.append((f"{where}.value", 'a function_call value must be a {"name", "arguments"} object or a '
                                             f"non-empty list of them, got {_type(value)}"))
        return []

    def listed(self, call: Any, where: str, issues: Issues) -> dict | None:
        """An entry of OpenAI's `tool_calls`: `{"id", "type": "function", "function": {"name", "arguments"}}`."""
        if not isinstance(call, dict):
            issues.append((where, f"a tool call must be an object, got {_type(call)}"))
            return None
        if call.get("type", "function") != "function":
            issues.append((f"{where}.type", f"only function calls are supported, got type {_show(call['type'])}"))
        return self.call(call.get("function"), call.get("id"), f"{where}.function", issues, id_at=f"{where}.id")

    def call(self, function: Any, call_id: Any, where: str, issues: Issues, id_at: str = "") -> dict | None:
        """One call of `function` (`{"name", "arguments"}` at `where`), checked and recorded as waiting."""
        if not isinstance(function, dict):
            issues.append((where, f"function must be an object, got {_type(function)}"))
            return None
        name = _text(function, "name", issues, where)
        arguments = _arguments(function.get("arguments"), f"{where}.arguments", issues)
        if call_id is None:
            call_id = next(f"call_{n}" for n in itertools.count(len(self.names)) if f"call_{n}" not in self.names)
        elif not isinstance(call_id, str) or not call_id.strip():
            issues.append((id_at, f"id must be a non-empty string, got {_show(call_id)}"))
        elif call_id in self.names:
            issues.append((id_at, f"id {_show(call_id)} is already an earlier call's"))
        if name is not None:
            self._check(name, arguments, where, issues)
        if isinstance(call_id, str):
            self.names[call_id] = name
            self.waiting.append(call_id)
        return {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments[0] if arguments else None}}

    def _check(self, name: str, arguments: tuple[str, dict] | None, where: str, issues: Issues) -> None:
        function = self.functions.get(name)
        if function is None:
            known = ", ".join(map(_show, self.functions))
            issues.append((f"{where}.name", f"a call to {_show(name)}, which is not in tools "
                                            f"({'tools: ' + known if known else 'the record has none'})"))
        elif arguments and isinstance(function.get("parameters"), dict):
            broken = _schema_break(function["parameters"], arguments[1])
            if broken:  # a warning: real data has some, and the call is still worth learning
                issues.warnings.append((f"{where}.arguments", f"arguments do not match the parameters of "
                                        f"{_show(name)}: {broken} (allowed, but the model learns a call the "
                                        "function would reject)"))

    def answer(self, call_id: Any, name: str | None, where: str, issues: Issues) -> str | None:
        """The id of the call a result answers: its `tool_call_id`, or in a spelling without ids the oldest call
        still waiting (of the function `name`, when the result names one)."""
        if call_id is None:
            waiting = [i for i in self.waiting if self.names[i] == name] or self.waiting
            if not waiting:
                issues.append((where, "a tool result that answers no earlier call (no call is waiting for one)"))
                return None
            call_id = waiting[0]
        elif not isinstance(call_id, str):
            issues.append((where, f"tool_call_id must be a string, got {_type(call_id)}"))
            return None
        elif call_id not in self.names:
            known = f" (earlier calls: {', '.join(map(_show, self.names))})" if self.names else ""
            issues.append((where, f"tool_call_id {_show(call_id)} answers no earlier call{known}"))
            return None
        if call_id in self.waiting:
            self.waiting.remove(call_id)
        return call_id


def _one_of(obj: dict, key: str, where: str, issues: Issues, known, what: str, expected: str,
            fold: Callable[[str], str] = str) -> str | None:
    """fold(obj[key]) if it is a string that folds to one of `known`, else None with an issue."""
    value = obj.get(key)
    if value is None:
        issues.append((f"{where}.{key}", f"missing {key}"))
    elif not isinstance(value, str):
        issues.append((f"{where}.{key}", f"{key} must be a string, got {_type(value)}"))
    elif fold(value) not in known:
        issues.append((f"{where}.{key}", f"unknown {what} {_show(value)} (expected {expected})"))
    else:
        return fold(value)
    return None


def _role(m: dict, where: str, issues: Issues) -> str | None:
    role = _one_of(m, "role", where, issues, (*ROLES, "function"), "role", "system, user, assistant or tool")
    if role is not None and role != "assistant" and (m.get("tool_calls") or m.get("function_call")):
        issues.append((f"{where}.tool_calls", f"only assistant messages make calls, not {_show(role)}"))
    return "tool" if role == "function" else role  # `function`: OpenAI's older spelling of a tool's result


def _message(m: Any, where: str, issues: Issues, calls: _Calls) -> dict | None:
    if not isinstance(m, dict):
        issues.append((where, f"message must be an object, got {_type(m)}"))
        return None
    role = _role(m, where, issues)
    tool_calls = calls.of_message(m, where, issues) if role == "assistant" else None
    if tool_calls or role == "tool":  # a call turn needs no text, and a tool may return an empty result
        content = _text(m, "content", issues, where, optional=bool(tool_calls), allow_empty=True)
    else:
        content = _text(m, "content", issues, where, empty="empty message", warn_empty=_EMPTY_TURN.get(role))
    message = {"role": role, "content": content}
    if tool_calls:
        message.update(content=content if content and content.strip() else None, tool_calls=tool_calls)
    elif role == "tool":
        name = _text(m, "name", issues, where, optional=True)  # the older spelling's: which function answered
        message["tool_call_id"] = calls.answer(m.get("tool_call_id"), name, f"{where}.tool_call_id", issues)
        if name is not None:
            message["name"] = name
    if "weight" in m:  # OpenAI's fine-tuning format: 0 = shown to the model but not learned
        weight = message["weight"] = m["weight"]
        if role != "assistant":
            issues.append((f"{where}.weight", f"weight is only allowed on assistant messages, not {_show(role)}"))
        elif type(weight) is not int or weight not in (0, 1):
            issues.append((f"{where}.weight", f"weight must be 0 or 1, got {_show(weight)}"))
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
    tools = _tools(obj, issues)
    calls = _Calls(tools)
    out = [_message(m, f"messages[{i}]", issues, calls) for i, m in enumerate(messages)]
    _require_learnable(out, "messages", issues)
    return {"messages": out, "tools": tools} if tools else {"messages": out}


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
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            issues.append((f"history[{i}]", "history turn must be a [user, assistant] pair of strings"))
            continue
        if not pair[1].strip():
            issues.append((f"history[{i}][1]", "empty message"))
        elif not pair[0].strip():
            issues.warnings.append((f"history[{i}][0]", _EMPTY_TURN["user"]))
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _parse_alpaca(obj: dict, issues: Issues) -> dict:
    instruction = _text(obj, "instruction", issues, allow_empty=True)
    extra = _text(obj, "input", issues, optional=True, allow_empty=True)
    output = _text(obj, "output", issues)
    parts = [part for part in (instruction, extra) if part and part.strip()]
    if instruction is not None and not parts:
        issues.warnings.append(("instruction", f"empty instruction and input: the user turn is empty "
                                               f"{_ALLOWED_BUT['user']}"))
    user = "\n\n".join(parts) or instruction
    return {"messages": _system(obj, issues) + _history(obj, issues)
            + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def _parse_sharegpt(obj: dict, issues: Issues) -> dict | None:
    turns = _list(obj, "conversations", issues)
    messages = _system(obj, issues)
    if turns is None:
        return None
    tools = _tools(obj, issues)
    calls = _Calls(tools)
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            issues.append((where, f"turn must be an object, got {_type(turn)}"))
            continue
        speaker = _one_of(turn, "from", where, issues, SHAREGPT_ROLES, "speaker",
                          f"one of {', '.join(SHAREGPT_ROLES)}", fold=str.lower)
        role = SHAREGPT_ROLES.get(speaker)
        if speaker == "function_call":
            messages.append({"role": role, "content": None, "tool_calls": calls.of_turn(turn, where, issues)})
        elif role == "tool":  # an observation answers the oldest call still waiting (ShareGPT has no ids)
            messages.append({"role": role, "content": _text(turn, "value", issues, where, allow_empty=True),
                             "tool_call_id": calls.answer(None, None, where, issues)})
        else:
            messages.append({"role": role, "content": _text(turn, "value", issues, where, empty="empty message",
                                                            warn_empty=_EMPTY_TURN.get(role))})
    _require_learnable(messages, "conversations", issues)
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


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
        if isinstance(text, _BadLine):
            yield Problem(str(path), number, None, text.message)
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
        if isinstance(text, _BadLine):
            yield Problem(str(path), number, None, text.message)
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
            yield Problem(str(path), number, None, f"expected 'token tag' but found one column {_show(columns[0])}")
            broken = True
        elif not _TAG.fullmatch(columns[-1]):
            yield Problem(str(path), number, None, f"tag {_show(columns[-1])} is not IOB/BIOES-shaped (expected O, "
                                                   "or B-, I-, E-, S-, L- or U- and a type, e.g. B-PER)")
            broken = True
        else:
            tokens.append(columns[0])
            tags.append(columns[-1])


def _csv_lines(path: Path, bad: list) -> Iterator[str]:
    """Lines for the csv module; an undecodable line is noted in `bad` (and fed on, replaced) so that
    the row it belongs to can be reported with the right line number."""
    for number, text in _lines(path, keepends=True):
        if isinstance(text, _BadLine):
            bad.append(Problem(str(path), number, None, text.message))
            text = text.text
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
        except csv.Error as err:  # a field over the csv module's size limit; the reader can't resync after it
            message = f"unreadable CSV: {err}"
            if "field limit" in str(err):
                message = (f"a field of the row starting here is over the csv module's limit of "
                           f"{csv.field_size_limit()} characters (is a quote opened here never closed?)")
            yield Problem(str(path), end + 1, None, message)
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

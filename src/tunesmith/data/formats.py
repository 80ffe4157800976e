"""Training data formats: read, validate and convert files into tunesmith's internal record shapes.

Everything downstream knows only these plain dicts (see the TypedDicts below): chat, completion,
classification, tagging, and for preference tuning pairs (preference) and single replies marked good or bad
(unpaired; both in `preference.py`). A reader per file format (in `readers.py`, registered in `FORMATS`) turns a
file into a stream of them; `detect_format` picks the reader from the extension and, for JSON, the keys
of the first record. Bad records become `Problem`s naming file, line and field, and every problem in a
file is found in one pass: `iter_records` streams the good records and raises one `DataError` listing
all the problems at the end. Data that is allowed but suspect (an empty system or user message, which
OpenAI's format accepts) gives warnings instead: listed by `validate`, logged by `iter_records`.

Conversion mapping (also in docs/formats.md):
- completion -> chat: [user: prompt, assistant: completion]; an empty prompt gives [assistant: completion]
  alone. Exact, and round-trips.
- chat -> completion: the last assistant message is the completion (any messages after it are dropped).
  If everything before it is exactly one user message, the prompt is that content, so single-turn chat
  round-trips; nothing before it gives prompt "". Otherwise the prompt is a plain transcript,
  "System: {s}\\n\\nUser: {u1}\\n\\nAssistant: {a1}\\n\\nUser: {u2}\\n\\nAssistant:", and the completion is
  " " + content. That is lossy: roles become text. Weights are always dropped.
- alpaca and sharegpt are read as chat; plain text as completion {"prompt": "", "completion": paragraph}.
- classification and tagging records have no chat or completion form; converting them is a DataError.
- chat records with tools (definitions, calls or results) keep them as chat; they have no completion form, so
  converting one to completion is a DataError too.
- preference pairs convert to preference (TRL's shape, an implicit prompt made explicit), openai-preference,
  kto (unpaired records; each pair gives a good and a bad one) and chat (the prompt and the chosen reply);
  unpaired records only to kto. Nothing else becomes a preference record: a preference needs two replies
  or a judgement the data does not hold.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, TypedDict

from ..errors import TunesmithError, UsageError
from .preference import chosen_chat, to_openai, to_unpaired
from .problems import Problem
from .readers import CONLL_SUFFIXES, CSV_SUFFIXES, FORMATS, JSON_SUFFIXES, ReadOptions, Reader
from .sources import first_object, has_content, json_values
from .tools import has_tools

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "FORMATS", "Problem", "DataError", "Report", "Reader", "Message", "ChatRecord", "Tool",
           "FunctionDefinition", "ToolCall", "FunctionCall", "CompletionRecord", "ClassificationRecord",
           "TaggingRecord", "PreferenceRecord", "UnpairedRecord", "kind_of", "detect_format", "iter_records", "read_records",
           "validate", "to_chat", "to_completion", "write_jsonl", "convert_file", "CONVERSIONS"]


# ---------------------------------------------------------------------------------------------------------
# record shapes
# ---------------------------------------------------------------------------------------------------------

class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCall(TypedDict):
    id: str  # given, or call_0, call_1... in record order where the input's spelling has none
    type: Literal["function"]
    function: FunctionCall


class _MessageBase(TypedDict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None  # None only on an assistant message that makes calls and says nothing


class Message(_MessageBase, total=False):
    weight: Literal[0, 1]  # assistant only, as in OpenAI fine-tuning: 0 = seen in context, not learned
    tool_calls: list[ToolCall]  # assistant only
    tool_call_id: str  # tool only: the call this result answers
    name: str  # tool only, when the input named the function that answered


class FunctionDefinition(TypedDict, total=False):
    name: str  # required
    description: str
    parameters: dict  # a JSON schema of the arguments object


class Tool(TypedDict):
    type: Literal["function"]
    function: FunctionDefinition


class _ChatBase(TypedDict):
    messages: list[Message]


class ChatRecord(_ChatBase, total=False):
    tools: list[Tool]  # absent when the record defines none


class CompletionRecord(TypedDict):
    prompt: str
    completion: str


class ClassificationRecord(TypedDict):
    text: str
    label: str


class TaggingRecord(TypedDict):
    tokens: list[str]
    tags: list[str]  # one IOB/BIOES tag per token


class _PreferenceBase(TypedDict):
    prompt: str | list[Message]  # a list: conversational, and then so are the replies
    chosen: str | list[Message]  # the assistant's turns (tool results between its calls and its answer)
    rejected: str | list[Message]


class PreferenceRecord(_PreferenceBase, total=False):
    tools: list[Tool]  # conversational only; absent when the record defines none


class _UnpairedBase(TypedDict):
    prompt: str | list[Message]
    completion: str | list[Message]
    label: bool  # true: a good reply, false: a bad one


class UnpairedRecord(_UnpairedBase, total=False):
    tools: list[Tool]


# The keys that identify each kind; also the order in which they are tried (unpaired before completion, whose
# keys it holds).
_KIND_KEYS = {"chat": ("messages",), "preference": ("prompt", "chosen", "rejected"),
              "unpaired": ("prompt", "completion", "label"), "completion": ("prompt", "completion"),
              "classification": ("text", "label"), "tagging": ("tokens", "tags")}
KINDS = tuple(_KIND_KEYS)
EMPTY = "empty file: no records"


class DataError(TunesmithError, ValueError):
    """Bad input data. `problems` holds every problem found; str() is a summary line, then one per line."""

    def __init__(self, problems: Iterable[Problem] | str = (), message: str | None = None):
        if isinstance(problems, str):  # DataError("a sentence"), like any other exception
            problems, message = (), problems
        self.problems, self._message = list(problems), message
        if message is None:
            n, files = len(self.problems), ", ".join(dict.fromkeys(p.file for p in self.problems))
            message = f"{n} problem{'s' if n != 1 else ''} in {files}:"
        # Problems start their lines with "file:line:", which editors and terminals turn into links.
        super().__init__("\n".join([message, *map(str, self.problems)]))

    def __reduce__(self):  # survive pickling (worker processes), which would otherwise pass str(self) back in
        return type(self), (self.problems, self._message)


def kind_of(record: dict) -> str:
    """"chat", "completion", "classification" or "tagging", from the record's keys."""
    for kind, keys in _KIND_KEYS.items():
        if all(key in record for key in keys):
            return kind
    expected = "; ".join(f"{'+'.join(keys)} ({kind})" for kind, keys in _KIND_KEYS.items())
    raise DataError(message=f"not a tunesmith record: keys {', '.join(map(str, record)) or '(none)'}; "
                            f"expected {expected}")


# ---------------------------------------------------------------------------------------------------------
# detection and reading
# ---------------------------------------------------------------------------------------------------------

# First match wins, which settles records that carry the keys of two shapes.
_SHAPES = ((("messages",), "openai-chat"), (("input", "preferred_output", "non_preferred_output"), "openai-preference"),
           (("chosen", "rejected"), "preference"), (("prompt", "completion", "label"), "kto"),
           (("prompt", "completion"), "completion"),
           (("instruction", "output"), "alpaca"), (("conversations",), "sharegpt"),
           (("text", "label"), "classification-jsonl"), (("tokens", "tags"), "tagging-jsonl"),
           (("tokens", "ner_tags"), "tagging-jsonl"), (("text",), "text"))


def detect_format(path) -> str:
    """The FORMATS name for a file, from its extension and, for .json/.jsonl, the first record's keys."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in CONLL_SUFFIXES:
        return "conll"
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix == ".txt":
        return "text"
    if suffix not in JSON_SUFFIXES:
        known = ", ".join((*JSON_SUFFIXES, *CSV_SUFFIXES, ".txt", *CONLL_SUFFIXES))
        raise DataError([Problem(str(path), None, None, f"cannot tell the format from the extension "
                                 f"{suffix or '(none)'!r}: expected one of {known}, or pass --format")])
    found = first_object(path)
    if found is None:
        if not has_content(path):
            raise DataError([Problem(str(path), None, None, EMPTY)])
        # Say why, with places: lines that don't parse at all are the usual reason (the first few will do).
        unreadable = itertools.islice((item for item in json_values(path) if isinstance(item, Problem)), 3)
        raise DataError([*unreadable, Problem(str(path), None, None, "no record is a JSON object, so the format "
                                                                   "cannot be detected")])
    number, unit, record = found
    for keys, name in _SHAPES:
        if all(key in record for key in keys):
            return name
    expected = "; ".join(f"{'+'.join(keys)} ({name})" for keys, name in _SHAPES)
    raise DataError([Problem(str(path), number, None, f"unrecognised record with keys "
                             f"{', '.join(record) or '(none)'}; expected {expected}; or pass --format", unit)])


def _format(path, format: str | None) -> str:
    if not Path(path).exists():  # fail now, with a sentence, rather than at the first next()
        raise FileNotFoundError(f"{path}: no such file")
    if format is None:
        return detect_format(path)
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    return format


def iter_records(path, *, format: str | None = None, text_column: str = "text", label_column: str = "label",
                 delimiter: str | None = None, problems: list[Problem] | None = None,
                 warnings: list[Problem] | None = None) -> Iterator[dict]:
    """Stream the valid records of `path` as internal records.

    Invalid records are skipped; their problems are appended to `problems` if given, else collected and
    raised as one DataError after the last record. Warnings (records read, but suspect) are appended to
    `warnings` if given, else summed up in one logged line. The format is resolved now, so an undetectable
    file raises here rather than on the first next().
    """
    reader = FORMATS[_format(path, format)]
    return _stream(Path(path), reader, ReadOptions(text_column, label_column, delimiter), problems, warnings)


def _stream(path: Path, reader: Reader, options: ReadOptions, sink: list | None,
            warning_sink: list | None) -> Iterator[dict]:
    found = [] if sink is None else sink
    warned = [] if warning_sink is None else warning_sink
    before, count, warnings = len(found), 0, len(warned)
    for item in reader(path, options):
        if isinstance(item, Problem):
            (warned if item.warning else found).append(item)
        else:
            count += 1
            yield item
    if count == 0 and len(found) == before:
        found.append(Problem(str(path), None, None, EMPTY))
    if warning_sink is None and warned:  # one line, not one per record: a file can hold millions
        logger.warning("%d warning(s) in %s, the first: %s (`tunesmith data validate %s` lists them all)",
                       len(warned) - warnings, path, warned[warnings], path)
    if sink is None and found:
        raise DataError(found)


def read_records(path, **kw) -> list[dict]:
    """All records of `path`, or a DataError listing every problem in it."""
    return list(iter_records(path, **kw))


@dataclass
class Report:
    path: str
    format: str | None  # None when it could not be detected
    kind: str | None
    count: int  # valid records
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # allowed but suspect; they don't make it not ok

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.path}: {self.count} valid {self.kind or 'unknown'} records ({self.format or 'unknown format'})"
        return "\n".join([f"{head}, {len(self.problems)} problem(s), {len(self.warnings)} warning(s)",
                          *map(str, self.problems), *map(str, self.warnings)])


def validate(path, **kw) -> Report:
    """Check a whole file; bad data ends up in the report, never raised (a missing file still raises)."""
    problems: list[Problem] = []
    warnings: list[Problem] = []
    try:
        name = _format(path, kw.pop("format", None))
    except DataError as err:
        return Report(str(path), None, None, 0, err.problems)
    count = sum(1 for _ in iter_records(path, format=name, problems=problems, warnings=warnings, **kw))
    return Report(str(path), name, FORMATS[name].kind, count, problems, warnings)


# ---------------------------------------------------------------------------------------------------------
# conversion and writing
# ---------------------------------------------------------------------------------------------------------

_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def _not_convertible(kind: str, to: str) -> str:
    return (f"{kind} records cannot be converted to {to}: they have no prompt and reply; "
            f"train them with a {kind} task instead")


def to_chat(record: dict) -> dict:
    """A chat record for a chat, completion or preference record (see the mapping in the module docstring)."""
    kind = kind_of(record)
    if kind == "chat":
        return record
    if kind == "preference":
        return chosen_chat(record)
    if kind != "completion":
        raise DataError(message=_not_convertible(kind, "chat"))
    user = [{"role": "user", "content": record["prompt"]}] if record["prompt"] else []
    return {"messages": user + [{"role": "assistant", "content": record["completion"]}]}


_NO_TOOL_COMPLETION = ("a tool conversation (tools, tool calls or tool results) has no completion form: keep it as "
                      "chat (convert --to chat, or sft_format: chat)")


def to_completion(record: dict) -> dict:
    """A completion record for a chat or completion record (see the mapping in the module docstring)."""
    kind = kind_of(record)
    if kind == "completion":
        return record
    if kind != "chat":
        raise DataError(message=_not_convertible(kind, "completion"))
    messages = record["messages"]
    if has_tools(messages, record.get("tools")):
        raise DataError(message=_NO_TOOL_COMPLETION)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(message="a chat record without an assistant message has no completion")
    before, answer = messages[:last], messages[last]["content"]
    if not before:
        return {"prompt": "", "completion": answer}
    if len(before) == 1 and before[0]["role"] == "user":
        return {"prompt": before[0]["content"], "completion": answer}
    turns = [f"{_LABELS[m['role']]}: {m['content']}" for m in before]
    return {"prompt": "\n\n".join(turns + ["Assistant:"]), "completion": " " + answer}


def write_jsonl(records: Iterable[dict], path, *, force: bool = False) -> int:
    """Write records as JSONL, atomically: a temp file in the same directory replaces `path` only once
    every record is written, so a failure (a DataError raised by a record stream included) leaves no
    partial file and any old one intact. Returns the number of records written."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force (force=True) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "x") rather than mkstemp: the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            count = 0
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


# --to: (the kinds it converts, record -> record or list of records). Plain dicts, defined once.
_CONVERTERS = {"chat": (("chat", "completion", "preference"), to_chat),
               "completion": (("chat", "completion"), to_completion),
               "preference": (("preference",), lambda record: record),
               "openai-preference": (("preference",), to_openai),
               "kto": (("preference", "unpaired"), lambda r: to_unpaired(r) if kind_of(r) == "preference" else r)}
CONVERSIONS = tuple(_CONVERTERS)


def _cannot_convert(kind: str, to: str) -> str:
    if kind in ("classification", "tagging"):
        return _not_convertible(kind, to)
    takes = " or ".join(_CONVERTERS[to][0])
    return (f"{kind} records cannot be converted to {to}: only {takes} records can (a preference needs two replies, "
            "or a judgement of one, that the data does not hold)")


def convert_file(src, dst, *, to: str, force: bool = False, **read_kw) -> int:
    """Convert `src` to a JSONL file of `to` records at `dst` (CONVERSIONS; see the module docstring), streaming.

    If any record of `src` has a problem, nothing is written and a DataError lists them all. `read_kw` are
    iter_records' options (format, text_column, label_column, delimiter). Returns the records written (a pair
    converted to unpaired gives two).
    """
    if to not in _CONVERTERS:
        raise DataError(f"cannot convert to {to!r}: expected one of {', '.join(_CONVERTERS)}")
    if "problems" in read_kw:
        raise TypeError("convert_file() takes no problems list: it writes nothing if there are any")
    name = _format(src, read_kw.pop("format", None))
    kind = FORMATS[name].kind
    kinds, convert = _CONVERTERS[to]
    if kind not in kinds:
        raise DataError([Problem(str(src), None, None, _cannot_convert(kind, to))])
    # iter_records raises its DataError after the last record, which write_jsonl turns into "no file".
    return write_jsonl(_converted(iter_records(src, format=name, **read_kw), convert, src), dst, force=force)


def _converted(records: Iterable[dict], convert, src) -> Iterator[dict]:
    """convert() of each record; a record it refuses (a tool conversation to completion) stops the file with
    a sentence that says which record."""
    for number, record in enumerate(records, 1):
        try:
            converted = convert(record)
        except DataError as err:
            raise DataError(message=f"{src}: record {number}: {err}") from None
        yield from converted if isinstance(converted, list) else [converted]

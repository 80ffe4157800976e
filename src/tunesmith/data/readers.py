"""File readers behind `tunesmith.data.formats`: one per input format, registered by name in `FORMATS`.

A reader turns a file into a stream of internal records and never raises for bad data. It yields either a
valid record (a plain dict in one of the shapes documented in `formats`) or a `Problem` naming file, line and
field, then moves on, so one pass over a file finds every problem. The JSON formats take their values from
`sources` and parse each with a function of `records`; plain text, CSV/TSV and CoNLL are read here.
"""

from __future__ import annotations

import csv
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

from .preference import parse_openai_pair, parse_pair, parse_unpaired
from .problems import Issues, Problem, json_type, quote
from .records import (parse_alpaca, parse_chat, parse_classification, parse_completion, parse_sharegpt,
                      parse_tagging, parse_text)
from .sources import BadLine, json_values, read_lines


JSON_SUFFIXES = (".json", ".jsonl")
CSV_SUFFIXES = (".csv", ".tsv")
CONLL_SUFFIXES = (".conll", ".iob", ".bio", ".bioes")
# IOB1/IOB2 use B-/I-, BIOES adds E-/S-, and BILOU spells those two L-/U-.
_TAG = re.compile(r"O|[BIESLU]-\S+")


@dataclass(frozen=True)
class ReadOptions:
    text_column: str = "text"  # CSV/TSV only
    label_column: str = "label"
    delimiter: str | None = None  # None: tab for .tsv, comma otherwise


Item = Union[dict, Problem]


@dataclass(frozen=True)
class Reader:
    """A registered format: the kind of record it yields and the function that reads a file."""

    kind: str
    read: Callable[[Path, ReadOptions], Iterator[Item]]

    def __call__(self, path, options: ReadOptions = ReadOptions()) -> Iterator[Item]:
        return self.read(Path(path), options)


# ---------------------------------------------------------------------------------------------------------
# JSON formats: values from `sources`, each parsed by one function of `records` (or `preference`)
# ---------------------------------------------------------------------------------------------------------

def _json_reader(parse: Callable[[dict, Issues], dict | None]) -> Callable[[Path, ReadOptions], Iterator[Item]]:
    def read(path: Path, options: ReadOptions) -> Iterator[Item]:
        for item in json_values(path):
            if isinstance(item, Problem):
                yield item
                continue
            number, unit, obj = item
            if not isinstance(obj, dict):
                yield Problem(str(path), number, None, f"record must be a JSON object, got {json_type(obj)}", unit)
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


# ---------------------------------------------------------------------------------------------------------
# line formats: plain text, CSV/TSV, CoNLL
# ---------------------------------------------------------------------------------------------------------

def _read_text(path: Path, options: ReadOptions) -> Iterator[Item]:
    """Paragraphs separated by blank lines, each one completion with an empty prompt; JSONL with `text`."""
    if path.suffix.lower() in JSON_SUFFIXES:
        yield from _json_reader(parse_text)(path, options)
        return
    lines, broken = [], False
    # A blank line after the last line flushes the last paragraph, so the loop needs no tail case.
    for number, text in itertools.chain(read_lines(path), [(0, "")]):
        if isinstance(text, BadLine):
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
    for number, text in itertools.chain(read_lines(path), [(0, "")]):  # the extra blank flushes the last sentence
        if isinstance(text, BadLine):
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
            yield Problem(str(path), number, None, f"expected 'token tag' but found one column {quote(columns[0])}")
            broken = True
        elif not _TAG.fullmatch(columns[-1]):
            yield Problem(str(path), number, None, f"tag {quote(columns[-1])} is not IOB/BIOES-shaped (expected O, "
                                                   "or B-, I-, E-, S-, L- or U- and a type, e.g. B-PER)")
            broken = True
        else:
            tokens.append(columns[0])
            tags.append(columns[-1])


def _csv_lines(path: Path, bad: list) -> Iterator[str]:
    """Lines for the csv module; an undecodable line is noted in `bad` (and fed on, replaced) so that
    the row it belongs to can be reported with the right line number."""
    for number, text in read_lines(path, keepends=True):
        if isinstance(text, BadLine):
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
    "openai-chat": Reader("chat", _json_reader(parse_chat)),
    "completion": Reader("completion", _json_reader(parse_completion)),
    "alpaca": Reader("chat", _json_reader(parse_alpaca)),
    "sharegpt": Reader("chat", _json_reader(parse_sharegpt)),
    "text": Reader("completion", _read_text),
    "csv": Reader("classification", _read_csv),
    "conll": Reader("tagging", _read_conll),
    "classification-jsonl": Reader("classification", _json_reader(parse_classification)),
    "tagging-jsonl": Reader("tagging", _json_reader(parse_tagging)),
    "preference": Reader("preference", _json_reader(parse_pair)),
    "openai-preference": Reader("preference", _json_reader(parse_openai_pair)),
    "kto": Reader("unpaired", _json_reader(parse_unpaired)),
}

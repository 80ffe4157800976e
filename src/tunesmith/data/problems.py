"""Data problems and how checks report them: `Problem` (one thing wrong, at a file:line a user can find),
`Issues` (one JSON record's errors and warnings, by field), and the helpers that read one field of a record
and quote values in messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


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


class Issues(list):
    """The (field, message) errors found in one JSON record; `warnings` holds the pairs that don't reject it."""

    def __init__(self):
        super().__init__()
        self.warnings: list[tuple[str, str]] = []


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages about JSON files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(type(value),
                                                                                          type(value).__name__)


def quote(value: Any) -> str:
    """A value as a message quotes it: a string in quotes, cut short (a line can be megabytes), a list or
    object by its type (its repr could be huge, or nested too deep to print), other scalars as JSON."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:60] + "…")
    return json_type(value) if isinstance(value, (list, dict)) else json.dumps(value)


def text_field(obj: dict, key: str, issues: Issues, where: str = "", *, optional: bool = False,
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
        issues.append((field, f"{key} must be a string, got {json_type(value)}"))
        return None
    if not allow_empty and not value.strip():
        if warn_empty:
            issues.warnings.append((field, warn_empty))
            return value
        issues.append((field, empty or f"empty {key}"))
        return None
    return value


def list_field(obj: dict, key: str, issues: Issues, where: str = "") -> list | None:
    """obj[key] if it is a non-empty list, else None with an issue at `where.key` (or `key`)."""
    field = f"{where}.{key}" if where else key
    value = obj.get(key)
    if value is None:
        issues.append((field, f"missing {key}"))
    elif not isinstance(value, list):
        issues.append((field, f"{key} must be a list, got {json_type(value)}"))
    elif not value:
        issues.append((field, f"{key} is empty"))
    else:
        return value
    return None

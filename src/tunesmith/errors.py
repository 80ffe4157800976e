"""The one root of every user-facing error. The CLI catches `TunesmithError` (and `OSError`) and prints it as
one sentence; anything else escaping is a bug and keeps its traceback.

Each module keeps its own subclass (DataError, ConfigError, ...) so callers can catch narrowly, and each also
derives from the builtin it always was (ValueError, RuntimeError), so existing `except ValueError` still works."""

from __future__ import annotations


class TunesmithError(Exception):
    """Something the user can fix: bad input, a missing file, an impossible setting. The message is a sentence
    that says what was wrong, where (file:line: field when there is one) and, when it helps, what to do."""


class UsageError(TunesmithError, ValueError):
    """A mistake in how a command was called (conflicting or missing options)."""

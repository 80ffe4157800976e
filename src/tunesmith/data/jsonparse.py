"""`parse_json`: json.loads for untrusted text; whatever Python's json module cannot read is a
json.JSONDecodeError with a position, never another exception.

Hostile input is bad data too: nesting deeper than Python's recursion limit, integers longer than its
int-to-str limit and unpaired surrogate escapes each become a JSONDecodeError at their place, so a reader
can report them as a Problem at their line rather than a traceback.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any


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

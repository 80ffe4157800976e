"""A small renderer for the Go `text/template` subset that Ollama's chat templates use, so a test can render a
conversation through a Modelfile's TEMPLATE without Ollama.

Covered: text, `{{ pipeline }}` with `{{-`/`-}}` whitespace trimming, `if`/`else if`/`else`/`end`, `range` (with
`$i, $m :=` and an `else`), variables (`$`, `$x := ...`, `$x = ...`), fields (`.Role`, `$.System`, `$m.Content`),
string and integer literals, parentheses, and the functions and, or, not, eq, ne, lt, le, gt, ge, len, slice and
index. Anything else is a `GoTemplateError`, never a silent guess. `ollama_values` builds the data Ollama hands
its templates (template/template.go: `collate`, then `.System`, `.Messages`, ...)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<number>-?\d+)|(?P<open>\()|(?P<close>\))"""
                    r"""|(?P<declare>:=)|(?P<assign>=)|(?P<comma>,)|(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)"""
                    r"""|(?P<ident>[A-Za-z_]\w*))""")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


class GoTemplateError(ValueError):
    """A template outside the supported subset, or one that fails as Go's text/template would fail."""


# ---------------------------------------------------------------------------------------------------------
# Parsing: text and actions into a tree of nodes
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _If:
    branches: list = field(default_factory=list)  # [(condition tokens, body nodes)]; the else branch has None
    current: list = field(default_factory=list)


@dataclass
class _Range:
    names: list
    pipe: list
    body: list = field(default_factory=list)
    otherwise: list = field(default_factory=list)
    current: list = None

    def __post_init__(self):
        self.current = self.body


def _lex(source: str) -> list:
    """[text or (action words)], with each `{{-`/`-}}` applied to the text beside it, as Go does."""
    parts, at, trim_next = [], 0, False
    for match in _ACTION.finditer(source):
        text = source[at:match.start()]
        text = text.lstrip(" \t\r\n") if trim_next else text
        parts.append(text.rstrip(" \t\r\n") if match.group(1) else text)
        parts.append(match.group(2).strip())
        at, trim_next = match.end(), bool(match.group(3))
    tail = source[at:]
    parts.append(tail.lstrip(" \t\r\n") if trim_next else tail)
    return parts


def _tokens(action: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(action):
        match = _TOKEN.match(action, at)
        if not match or match.end() == at:
            raise GoTemplateError(f"cannot read {action[at:]!r} in {{{{ {action} }}}}")
        out.append((match.lastgroup, match.group(match.lastgroup)))
        at = match.end()
        while at < len(action) and action[at].isspace():
            at += 1
    return out


def parse(source: str) -> list:
    """The template as a list of nodes: str (text), ("print", tokens), ("set", name, tokens, declare),
    _If and _Range."""
    root: list = []
    stack: list = [root]
    for i, part in enumerate(_lex(source)):
        if i % 2 == 0:
            if part:
                _body(stack[-1]).append(part)
            continue
        words = _tokens(part)
        keyword = words[0][1] if words and words[0][0] == "ident" else None
        if keyword == "if":
            node = _If()
            node.branches.append((words[1:], node.current))
            _body(stack[-1]).append(node)
            stack.append(node)
        elif keyword == "range":
            node = _range(words[1:])
            _body(stack[-1]).append(node)
            stack.append(node)
        elif keyword == "else":
            _else(stack[-1], words[1:], part)
        elif keyword == "end":
            if len(stack) == 1:
                raise GoTemplateError("{{ end }} without an open if or range")
            stack.pop()
        elif keyword in ("with", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"{{{{ {part} }}}}: `{keyword}` is outside the supported subset")
        elif len(words) >= 2 and words[0][0] == "var" and words[1][0] in ("declare", "assign"):
            _body(stack[-1]).append(("set", words[0][1], words[2:], words[1][0] == "declare"))
        else:
            _body(stack[-1]).append(("print", words))
    if len(stack) != 1:
        raise GoTemplateError("unexpected end of template: an if or range has no {{ end }}")
    return root


def _body(node) -> list:
    return node if isinstance(node, list) else node.current


def _range(words: list) -> _Range:
    names = []
    while len(words) >= 2 and words[0][0] == "var" and words[1][0] in ("comma", "declare"):
        names.append(words[0][1])
        words = words[2:]
    return _Range(names, words)


def _else(node, words: list, part: str) -> None:
    if isinstance(node, _Range) and not words:
        node.current = node.otherwise
    elif isinstance(node, _If) and node.branches[-1][0] is not None:
        if words and words[0] != ("ident", "if"):
            raise GoTemplateError(f"{{{{ {part} }}}}: only `else` and `else if` are supported")
        node.current = []
        node.branches.append((words[1:] if words else None, node.current))
    else:
        raise GoTemplateError(f"{{{{ {part} }}}} outside an if or range, or after its else")


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

def truth(value) -> bool:
    """Go's truth: false, 0, nil and empty strings, lists and maps are false."""
    return value is not None and value is not False and value != 0 and not (
        isinstance(value, (str, list, tuple, dict)) and len(value) == 0)


def _comparable(a, b, name: str):
    if type(a) is not type(b) and not (isinstance(a, int) and isinstance(b, int)):
        raise GoTemplateError(f"{name}: incompatible types for comparison: {a!r} and {b!r}")
    return a, b


def _eq(first, *others):
    if not others:
        raise GoTemplateError("eq needs at least two arguments")
    return any(first == other for other in (_comparable(first, o, "eq")[1] for o in others))


def _slice(value, *bounds):
    if not 1 <= len(bounds) + 1 <= 3:
        raise GoTemplateError("slice takes one or two indexes here")
    return value[bounds[0]:bounds[1]] if len(bounds) == 2 else value[bounds[0]:]


_FUNCTIONS = {
    "not": lambda value: not truth(value),
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": lambda a, b: (lambda x, y: x < y)(*_comparable(a, b, "lt")),
    "le": lambda a, b: (lambda x, y: x <= y)(*_comparable(a, b, "le")),
    "gt": lambda a, b: (lambda x, y: x > y)(*_comparable(a, b, "gt")),
    "ge": lambda a, b: (lambda x, y: x >= y)(*_comparable(a, b, "ge")),
    "len": len,
    "slice": _slice,
    "index": lambda value, key: value[key],
}


class _Scope:
    """Variables by name, innermost last: a variable lives until the `end` of the block that declared it."""

    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name: str):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name: str, value) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"undefined variable {name} (assigned with = before any :=)")


def _field(value, names: list[str], where: str):
    for name in names:
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"{where}: no field {name!r} in {type(value).__name__}")
        value = value[name]
    return value


def _operand(words: list, at: int, dot, scope: _Scope):
    """(value, next index) of the operand at words[at]."""
    kind, text = words[at]
    if kind == "string":
        if text.startswith("`"):
            return text[1:-1], at + 1
        return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), text[1:-1]), at + 1
    if kind == "number":
        return int(text), at + 1
    if kind == "field":
        return (dot if text == "." else _field(dot, text[1:].split("."), text)), at + 1
    if kind == "var":
        name, *names = text.split(".")
        return _field(scope.get(name), names, text), at + 1
    if kind == "ident" and text in ("true", "false"):
        return text == "true", at + 1
    if kind == "open":
        depth, end = 1, at + 1
        while depth:
            if end >= len(words):
                raise GoTemplateError("unclosed parenthesis")
            depth += {"open": 1, "close": -1}.get(words[end][0], 0)
            end += 1
        return _evaluate(words[at + 1:end - 1], dot, scope), end
    raise GoTemplateError(f"unexpected {text!r}")


def _evaluate(words: list, dot, scope: _Scope):
    """The value of one command: a function applied to its arguments, or a single operand."""
    if not words:
        raise GoTemplateError("empty command")
    kind, name = words[0]
    if kind == "ident" and name not in ("true", "false"):
        if name in ("and", "or"):  # short-circuit, as Go 1.18+: the first false (and) or true (or) argument
            value, at = None, 1
            while at < len(words):
                value, at = _operand(words, at, dot, scope)
                if truth(value) == (name == "or"):
                    return value
            return value
        if name not in _FUNCTIONS:
            raise GoTemplateError(f"function {name!r} is not defined (supported: and, or, {', '.join(_FUNCTIONS)})")
        args, at = [], 1
        while at < len(words):
            value, at = _operand(words, at, dot, scope)
            args.append(value)
        return _FUNCTIONS[name](*args)
    value, at = _operand(words, 0, dot, scope)
    if at != len(words):
        raise GoTemplateError(f"{words[at][1]!r} after a value: only a function can take arguments")
    return value


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    raise GoTemplateError(f"printing {type(value).__name__} values is outside the supported subset")


def _run(nodes: list, dot, scope: _Scope, out: list) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _If):
            for condition, body in node.branches:
                if condition is None or truth(_evaluate(condition, dot, scope)):
                    _block(body, dot, scope, out)
                    break
        elif isinstance(node, _Range):
            _loop(node, dot, scope, out)
        elif node[0] == "set":
            _, name, words, declare = node
            value = _evaluate(words, dot, scope)
            if declare:
                scope.frames[-1][name] = value
            else:
                scope.assign(name, value)
        else:
            out.append(_text(_evaluate(node[1], dot, scope)))


def _block(body: list, dot, scope: _Scope, out: list, variables: dict | None = None) -> None:
    scope.frames.append(dict(variables or {}))
    try:
        _run(body, dot, scope, out)
    finally:
        scope.frames.pop()


def _loop(node: _Range, dot, scope: _Scope, out: list) -> None:
    items = _evaluate(node.pipe, dot, scope)
    if not isinstance(items, (list, tuple)):
        raise GoTemplateError(f"range over {type(items).__name__}: only lists are supported")
    if not items:
        _block(node.otherwise, dot, scope, out)
    for index, item in enumerate(items):
        names = dict(zip(node.names, (index, item))) if len(node.names) == 2 else dict.fromkeys(node.names, item)
        _block(node.body, item, scope, out, names)


def render(source: str, data: dict) -> str:
    """`source` executed on `data`, as Go's text/template would print it."""
    out: list[str] = []
    _run(parse(source), data, _Scope(data), out)
    return "".join(out)


def ollama_values(messages: list[dict], *, think: bool | None = None) -> dict:
    """What Ollama hands a chat template for `messages` (template.go's Execute): `.Messages` collated (a message
    that follows one of the same role, tools aside, is merged into it with a blank line), system messages kept
    among them, `.System` their contents joined by blank lines, `.Think` and `.IsThinkSet` from `think`."""
    collated: list[dict] = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"] and message["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"],
                             "Thinking": message.get("thinking", ""), "ToolCalls": []})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": collated, "Tools": [], "Response": "", "Think": bool(think),
            "IsThinkSet": think is not None}

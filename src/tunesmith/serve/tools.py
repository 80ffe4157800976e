"""The server's side of tool calling: what a chat request's tools and tool_choice mean for its prompt, for the
decoding (a grammar that forces a call under "required" or a named function) and for its reply (OpenAI's
`tool_calls`, or the older `function_call`), streamed or not. Calls are printed and parsed by data/tools.py, as
the run was trained, so nothing here knows a template.

Streaming: text that may be the start of a call is held back (a reply never streams raw `<tool_call>` markup as
content). A call streams as OpenAI's do: its first chunk (index, id, name) once the model has written its name
and begun its arguments object, then that object's text as the model writes it. When the reply ends it is
parsed exactly as the non-streamed reply is, so the chunks add up to the same message; a reply whose calls do
not parse (under "auto") comes back as content with finish_reason "stop" or "length" (`ReplyStream.end`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .. import runs
from ..data.tools import CALL_CLOSE, CALL_OPEN, call_style, parse_reply, with_ids
from ..generation.grammar import tool_call_grammar

PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a JSON call with it (parse_reply drops it)


def run_tools(name: str, run: str | None) -> dict | None:
    """How the run served as `name` was trained with tools (run.json's `tools`, e.g. {"mode": "convention",
    "style": "hermes"}), or None: not a run, or trained without tools."""
    info = runs.find_run(run or name)
    if info is None:
        return None
    return info.tools


@dataclass
class Finished:
    """A finished reply: `record` as the conversation store keeps it (calls under `tool_calls`, with ids),
    `message` as the response carries it (the older API's `function_call` for a request with `functions`)."""

    record: dict
    message: dict
    reason: str  # finish_reason: "tool_calls" / "function_call" when it called, else the engine's


@dataclass
class ToolPlan:
    """What one request does with tools. `choice`: "none", "auto", "required" or the one function's name."""

    tools: list[dict] | None  # OpenAI's tools entries, for the prompt (None: no tools)
    choice: str = "none"
    parallel: bool = True
    legacy: bool = False  # the older functions API: the reply's one call as `function_call`
    style: str = "hermes"  # how the model writes calls (data/tools.py's call_style)
    functions: list[dict] = field(default_factory=list)  # {"name", "parameters"} of each tool

    @classmethod
    def of(cls, body, template: str, trained: dict | None = None, data: dict | None = None) -> ToolPlan:
        """The plan for a ChatRequest served with `template`; `trained` (run_tools) fixes the style. The prompt
        gets the tools as the client sent them (`data`, the request's JSON: keys in its order, as in the
        training file it presumably shares a producer with); the grammar gets the validated definitions."""
        functions = [f.model_dump(exclude_none=True) for f in body.functions_of_tools]
        data = data or {}
        sent = data.get("tools") or [{"type": "function", "function": f} for f in data.get("functions") or []]
        tools = (sent or [{"type": "function", "function": f} for f in functions]) if functions else None
        style = (trained or {}).get("style") or call_style(template)
        parallel = body.parallel_tool_calls is not False and not body.legacy
        return cls(tools, body.choice, parallel, body.legacy, style, functions)

    @property
    def parses(self) -> bool:
        """Whether replies are read for calls: under "none" the model is not to call, and nothing is parsed."""
        return bool(self.tools) and self.choice != "none"

    def grammar(self):
        """The Grammar that forces a call ("required": any function, a name: that one), or None."""
        if not self.tools or self.choice in ("none", "auto"):
            return None
        named = [f for f in self.functions if f["name"] == self.choice]
        return tool_call_grammar(named or self.functions, self.style,
                                 parallel=self.parallel and self.choice == "required")

    def read(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, calls) of a finished reply; calls with ids, at most one unless parallel calls are allowed.

        A call's `arguments` is the model's own text of its arguments object, not parse_reply's re-serialised
        json.dumps of it: argument fragments stream as the model writes them, before the object is complete, so
        only the written text can be what they add up to (OpenAI's arguments are the model's text too). It is
        taken only where it reads back as parse_reply's object (same dumps), so a client's json.loads gets what
        evaluation scores; a call where it does not (a second "name" or arguments key that overrides the first,
        which may already have streamed) makes the reply content. Evaluation and the Python API keep
        parse_reply's strings. An arguments value that is not an object literal (a JSON string of one) streams
        nothing and keeps parse_reply's string."""
        if not self.parses:
            return text, None
        content, calls = parse_reply(text, self.style)
        if not calls:
            return text, None
        calls = calls if self.parallel else calls[:1]
        scan = CallScan(self.style)
        scan.update(text)
        for call, found in zip(calls, scan.calls):
            function, written = call["function"], found.arguments(text)
            if not found.reader.ok or found.reader.name != function["name"] or written is not None and \
                    json.dumps(json.loads(written), ensure_ascii=False) != function["arguments"]:
                return text, None
            function["arguments"] = written if written is not None else function["arguments"]
        return content, with_ids(calls)

    def finish(self, text: str, finish: str) -> Finished:
        """What a finished reply is: its record, its message as the client asked for it, its finish_reason."""
        content, calls = self.read(text)
        record = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
        if not calls:
            return Finished(record, record, finish)
        if self.legacy:
            return Finished(record, {"role": "assistant", "content": content,
                                     "function_call": calls[0]["function"]}, "function_call")
        return Finished(record, record, "tool_calls")

    def stream(self) -> ReplyStream:
        return ReplyStream(self)


_SCALAR = frozenset("-+.0123456789eE" "truefalsn" "NaIifty")  # numbers, literals, and json.loads' NaN/Infinity
_ARGUMENT_KEYS = ("arguments", "parameters")  # parameters: Llama 3.1's calls (parse_reply reads both)
_CLOSER = {"{": "}", "[": "]"}


class CallReader:
    """One call object, `{"name": ..., "arguments": {...}}`, read as it is generated, a character at a time:
    its name once written, where its arguments object lies in the text, and how far the text is still the
    start of a JSON object that json.loads would read (its grammar, each complete token checked by json.loads)."""

    def __init__(self):
        self.pos = 0  # characters read
        self.valid = 0  # how many of them are the start of a JSON object
        self.ok = True
        self.stack: list[str] = []  # the open "{" and "["
        self.want = "value"  # what comes next: value, key, colon, next (after a value), done (the object closed)
        self.empty = False  # just opened: it may close at once
        self.token = ""  # the string (quote included) or number/literal being read
        self.escaped = False
        self.key: str | None = None  # the call object's key whose value is being read
        self.name: str | None = None
        self.start: int | None = None  # the first arguments object: text[start:end]
        self.end: int | None = None

    def feed(self, text: str) -> None:
        for c in text:
            if self.ok:
                self._read(c)
                self.valid = self.pos + 1 if self.ok else self.pos
            self.pos += 1

    def _read(self, c: str) -> None:
        if self.token[:1] == '"':
            self.token += c
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self._token()
            return
        if self.token:
            if c in _SCALAR:
                self.token += c
                return
            self._token()  # a number or literal ends at the first character that cannot continue it
        if c not in " \t\n\r" and self.ok:
            self._structure(c)

    def _token(self) -> None:
        token, self.token = self.token, ""
        try:
            value = json.loads(token)
        except ValueError:
            self.ok = False
            return
        if self.want == "key":
            self.key = value if len(self.stack) == 1 else self.key
            self.want = "colon"
            return
        if len(self.stack) == 1 and self.key == "name" and self.name is None and isinstance(value, str):
            self.name = value
        self._after_value()

    def _after_value(self) -> None:
        self.want = "next" if self.stack else "done"

    def _structure(self, c: str) -> None:
        want, empty, self.empty = self.want, self.empty, False
        if want == "value" and (c == "{" or self.stack and c == "["):  # a call is an object
            if c == "{" and len(self.stack) == 1 and self.key in _ARGUMENT_KEYS and self.start is None:
                self.start = self.pos
            self.stack.append(c)
            self.want, self.empty = ("key" if c == "{" else "value"), True
        elif self.stack and (c == '"' and want in ("key", "value") or c in _SCALAR and want == "value"):
            self.token = c
        elif c == ":" and want == "colon":
            self.want = "value"
        elif c == "," and want == "next":
            self.want = "key" if self.stack[-1] == "{" else "value"
        elif self.stack and c == _CLOSER[self.stack[-1]] and (want == "next" or empty):
            self.stack.pop()
            if len(self.stack) == 1 and self.start is not None and self.end is None:
                self.end = self.pos + 1
            self._after_value()
        else:
            self.ok = False


@dataclass
class Call:
    """A call in a reply: where its markup begins (`tag`), where its object's text begins (`offset`), and its
    reader."""

    tag: int
    offset: int
    reader: CallReader = field(default_factory=CallReader)

    def arguments(self, text: str) -> str | None:
        """The text of its arguments object, once read whole (None: none, or not an object literal)."""
        r = self.reader
        return text[self.offset + r.start:self.offset + r.end] if r.end is not None else None


class CallScan:
    """The calls of a reply as it grows, found where parse_reply finds them: hermes, after each `<tool_call>` up
    to the first `</tool_call>` after it; json, the whole reply once (past blank space and Llama's python tag)
    it opens with `{`. `update(text)` reads the reply so far."""

    def __init__(self, style: str):
        self.style, self.calls, self.pos, self.inside = style, [], 0, False

    def update(self, text: str) -> None:
        if self.style == "json":
            if not self.calls:
                body = text.lstrip().removeprefix(PYTHON_TAG).lstrip()
                if not body.startswith("{"):
                    return
                self.pos = len(text) - len(body)
                self.calls.append(Call(self.pos, self.pos))
            self.calls[-1].reader.feed(text[self.pos:])
            self.pos = len(text)
            return
        while True:
            if not self.inside:
                found = text.find(CALL_OPEN, self.pos)
                if found < 0:
                    self.pos = max(self.pos, len(text) - len(CALL_OPEN) + 1)
                    return
                self.pos, self.inside = found + len(CALL_OPEN), True
                self.calls.append(Call(found, self.pos))
            close = text.find(CALL_CLOSE, self.pos)
            # Until it is whole, what may begin the closing tag is not the object's text: keep it from the reader.
            upto = close if close >= 0 else next((i for i in range(max(self.pos, len(text) - len(CALL_CLOSE) + 1),
                                                                   len(text)) if CALL_CLOSE.startswith(text[i:])),
                                                 len(text))
            self.calls[-1].reader.feed(text[self.pos:upto])
            self.pos = upto
            if close < 0:
                return
            self.pos, self.inside = close + len(CALL_CLOSE), False


@dataclass
class Streamed:
    """A call whose first chunk went out: the id the client has, how much of its arguments it has."""

    id: str
    sent: int = 0


class ReplyStream:
    """One streamed choice: `feed(text)` returns the deltas that may go out now (content, calls' first chunks
    and argument fragments); `end(finish)` returns the closing deltas and the finished reply.

    The rule under "auto", where a call may turn out not to parse: a call streams once its name is written and
    its arguments object has begun, and its fragments stop where the text stops being the start of a JSON
    object. If the finished reply then does not parse as calls (the model broke off, wrote something else, or
    hit max_tokens), the client has had that call's first chunks, and the stream ends as the non-streamed reply
    does: the text not yet sent as `content` (so the content deltas add up to the whole reply, markup included)
    and the engine's finish_reason, "stop" or "length", never "tool_calls". Calls forced by the grammar always
    parse, so there their fragments are the whole arguments."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent = plan, "", 0
        self.scan = CallScan(plan.style)
        self.streamed: list[Streamed] = []

    def feed(self, text: str) -> list[dict]:
        self.text += text
        if not self.plan.parses:
            return self._content(len(self.text))
        self.scan.update(self.text)
        deltas = self._content(self._safe())
        for index, call in enumerate(self.scan.calls if self.plan.parallel else self.scan.calls[:1]):
            deltas += self._call(index, call)
        return deltas

    def _content(self, upto: int) -> list[dict]:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return [{"content": out}] if out else []

    def _safe(self) -> int:
        """How much of the text can stream as content."""
        text, calls = self.text, self.scan.calls
        if self.plan.style == "json":  # a call is the whole reply: decided by how it starts
            if calls or PYTHON_TAG.startswith(text.strip()):  # a call, or nothing yet but (part of) the tag
                return self.sent
            return len(text)
        if calls:  # the text before the first call; a call's content is stripped around it
            return max(self.sent, len(text[:calls[0].tag].rstrip()))
        # Hold back what may begin the tag, and trailing whitespace.
        cut = next((i for i in range(max(self.sent, len(text) - len(CALL_OPEN) + 1), len(text))
                    if CALL_OPEN.startswith(text[i:])), len(text))
        return max(self.sent, len(text[:cut].rstrip()))

    def _call(self, index: int, call: Call) -> list[dict]:
        """Call `index`'s deltas that may go out now: its first chunk once its name is known and its arguments
        object has begun, then what has been read of that object. Calls go out in order: one starts only after
        the one before it went out whole."""
        r, deltas = call.reader, []
        if r.name is None or r.start is None or index > len(self.streamed):
            return []
        if index == len(self.streamed):
            if index and not self._whole(index - 1):
                return []
            self.streamed.append(Streamed(with_ids([{}])[0]["id"]))  # the id format is data.tools'
            deltas.append(self._delta(index, "", r.name))
        done = self.streamed[index]
        upto = call.offset + min(r.valid, r.end if r.end is not None else r.valid)
        fragment = self.text[call.offset + r.start + done.sent:upto]
        done.sent += len(fragment)
        return deltas + ([self._delta(index, fragment)] if fragment else [])

    def _whole(self, index: int) -> bool:
        r = self.scan.calls[index].reader
        return r.end is not None and self.streamed[index].sent == r.end - r.start

    def _delta(self, index: int, arguments: str, name: str | None = None, id: str | None = None) -> dict:
        """A call's chunk, its first (name, arguments "") or an arguments fragment, in the client's shape."""
        function = {"name": name, "arguments": arguments} if name is not None else {"arguments": arguments}
        if self.plan.legacy:
            return {"function_call": function}
        if name is None:
            return {"tool_calls": [{"index": index, "function": function}]}
        return {"tool_calls": [{"index": index, "id": id or self.streamed[index].id, "type": "function",
                                "function": function}]}

    def end(self, finish: str) -> tuple[list[dict], Finished]:
        """The deltas that close this choice (the content held back, then what has not gone out of each call),
        and what it was; streamed calls keep the ids their first chunks gave them."""
        done = self.plan.finish(self.text, finish)
        deltas, content, sent = [], done.message["content"] or "", self.text[:self.sent]
        # What streamed is the content's start (only text that may end it is held back), except leading
        # whitespace before content that precedes a call: the parse strips it after it went out.
        if content.startswith(sent) and len(content) > len(sent):
            deltas.append({"content": content[len(sent):]})
        for index, call in enumerate(done.record.get("tool_calls") or []):
            function = call["function"]
            if index < len(self.streamed):  # its arguments start with what went out (ToolPlan.read)
                call["id"], rest = self.streamed[index].id, function["arguments"][self.streamed[index].sent:]
            else:
                deltas.append(self._delta(index, "", function["name"], call["id"]))
                rest = function["arguments"]
            if rest:
                deltas.append(self._delta(index, rest))
        return deltas, done

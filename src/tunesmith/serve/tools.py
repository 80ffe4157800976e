"""The server's side of tool calling: what a chat request's tools and tool_choice mean for its prompt, for the
decoding (a grammar that forces a call under "required" or a named function) and for its reply (OpenAI's
`tool_calls`, or the older `function_call`), streamed or not. Calls are printed and parsed by data/tools.py, as
the run was trained, so nothing here knows a template.

Streaming: text that may be the start of a call is held back (a reply never streams raw `<tool_call>` markup as
content); once a call has begun the rest of the reply is kept until it ends, then parsed exactly as the
non-streamed reply is, so the chunks add up to the same message. A call that does not parse comes back as
content with finish_reason "stop"."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import runs
from ..data.tools import CALL_OPEN, call_style, parse_reply, with_ids
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
        """(content, calls) of a finished reply; calls with ids, at most one unless parallel calls are allowed."""
        if not self.parses:
            return text, None
        content, calls = parse_reply(text, self.style)
        if not calls:
            return text, None
        return content, with_ids(calls if self.parallel else calls[:1])

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


class ReplyStream:
    """One streamed choice: `feed(text)` returns the content that may go out now; `end(finish)` returns the
    closing deltas (the content held back, then each call) and the finish_reason."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent, self.calling = plan, "", 0, False

    def feed(self, text: str) -> str:
        self.text += text
        if self.calling:
            return ""
        if not self.plan.parses:
            return self._send(len(self.text))
        safe = self._safe()
        if safe is None:
            self.calling = True
            return ""
        return self._send(safe)

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out

    def _safe(self) -> int | None:
        """How much of the text can stream as content; None once a call has begun (keep the rest)."""
        text = self.text
        if self.plan.style == "json":  # a call is the whole reply: decided by how it starts
            head = text.lstrip()
            if PYTHON_TAG.startswith(head.rstrip()):  # nothing yet but whitespace or (part of) the tag
                return self.sent
            return None if head.removeprefix(PYTHON_TAG).lstrip().startswith("{") else len(text)
        if CALL_OPEN in text[self.sent:]:
            return None
        # Hold back what may begin the tag, and trailing whitespace: a call's content is stripped around it.
        cut = next((i for i in range(max(self.sent, len(text) - len(CALL_OPEN) + 1), len(text))
                    if CALL_OPEN.startswith(text[i:])), len(text))
        return max(self.sent, len(text[:cut].rstrip()))

    def end(self, finish: str) -> tuple[list[dict], Finished]:
        """The deltas that close this choice (the content held back, then each call), and what it was."""
        done = self.plan.finish(self.text, finish)
        deltas, message = [], done.message
        content, sent = message["content"] or "", self.text[:self.sent]
        # What streamed is the content's start (only text that may end it is held back), except leading
        # whitespace before content that precedes a call: the parse strips it after it went out.
        if content.startswith(sent) and len(content) > len(sent):
            deltas.append({"content": content[len(sent):]})
        if "function_call" in message:
            call = message["function_call"]
            deltas += [{"function_call": {"name": call["name"], "arguments": ""}},
                       {"function_call": {"arguments": call["arguments"]}}]
        for index, call in enumerate(message.get("tool_calls") or []):
            deltas += [{"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                        "function": {"name": call["function"]["name"], "arguments": ""}}]},
                       {"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]}]
        return deltas, done

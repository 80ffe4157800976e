"""Tool calling in conversations: how tool definitions, calls and results reach a chat template, and how calls
are read back out of a generated reply. Training, evaluation, `tunesmith chat` and both server backends go
through these functions, so a run is served exactly the way it was trained.

Inside tunesmith a chat record may carry OpenAI's shapes (docs/formats.md):

    {"tools": [{"type": "function", "function": {"name", "description", "parameters": JSON schema}}],
     "messages": [..., {"role": "assistant", "content": None, "tool_calls": [
                           {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{...}"}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "result text"}, ...]}

Two ways to render them:
- `native`: the model's own template prints tools (it reads `tools` and `tool_calls`: Qwen2.5/3, Hermes,
  Llama 3.1+, Mistral...). Messages go to it with each call's arguments as an object, as transformers'
  templates expect, and `tools=` beside them.
- `convention` (tunesmith's, for templates without tool support such as SmolLM2's ChatML): the definitions
  are appended to the system turn (one is added when there is none) in the Hermes/Qwen2.5 wording, each call
  is a JSON object `{"name": ..., "arguments": {...}}` inside `<tool_call>...</tool_call>` in the assistant's
  content, and each result is a turn of role `tool` with the result as its content. Everything then renders as
  plain role/content messages.

Replies are read back by the way the template prints calls (`call_style`): `hermes` (`<tool_call>` tags: the
convention, Qwen, Hermes) or `json` (the whole reply one JSON object with `name` and `parameters` or `arguments`,
as Llama 3.1's template prints calls). A reply whose calls do not parse is plain content (`parse_reply`)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Literal

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
Mode = Literal["native", "convention"]
Style = Literal["hermes", "json"]

# Qwen2.5's own wording (which Hermes-style models were trained on), so a base model that knows it follows it.
_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
             "with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each "
             "function call, return a json object with function name and arguments within <tool_call></tool_call> "
             'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def has_tools(messages: list[dict], tools: list[dict] | None = None) -> bool:
    """Whether a conversation involves tools at all (definitions, calls or results)."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def supports_tools(template: str) -> bool:
    """Whether a chat template prints tool definitions and calls itself (it reads `tools` and `tool_calls`)."""
    return "tools" in template and "tool_calls" in template


def render_mode(template: str) -> Mode:
    return "native" if supports_tools(template) else "convention"


def call_style(template: str) -> Style:
    """How calls appear in a reply of a model trained with `template` (see the module docstring)."""
    if render_mode(template) == "convention" or CALL_OPEN in template:
        return "hermes"
    return "json"


def function_of(tool: dict) -> dict:
    """The function object of a tools entry, OpenAI's `{"type": "function", "function": {...}}` or the older
    bare `functions` entry `{"name", "description", "parameters"}`."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def arguments_object(arguments) -> dict:
    """A call's arguments as an object: OpenAI sends a JSON string, templates want the object. ValueError when
    they are not a JSON object."""
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    if not isinstance(value, dict):
        raise ValueError(f"arguments must be a JSON object, got {type(value).__name__}")
    return value


def format_call(name: str, arguments) -> str:
    """One call as the convention prints it (Qwen2.5's template prints it the same way)."""
    body = json.dumps({"name": name, "arguments": arguments_object(arguments)}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def definitions_text(tools: list[dict]) -> str:
    """The system-turn text that tells the model which functions it may call."""
    listed = "\n".join(json.dumps({"type": "function", "function": function_of(t)}, ensure_ascii=False)
                       for t in tools)
    return _PREAMBLE.format(tools=listed)


def _convention(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    out = []
    for m in messages:
        keep = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id", "name")}
        if m.get("tool_calls"):
            calls = [format_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            text = (m.get("content") or "").strip()
            keep["content"] = "\n".join(([text] if text else []) + calls)
        elif keep.get("content") is None:
            keep["content"] = ""
        out.append(keep)
    if tools:
        if out and out[0]["role"] == "system":
            system = out[0]["content"].rstrip()
            out[0] = {**out[0], "content": (system + "\n\n" if system else "") + definitions_text(tools)}
        else:
            out.insert(0, {"role": "system", "content": definitions_text(tools)})
    return out


def _native(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"],
                                                  "arguments": arguments_object(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def for_template(messages: list[dict], tools: list[dict] | None, template: str) -> tuple[list[dict], list | None]:
    """(messages, tools) as `template` is to be given them: unchanged when no tools are involved; with the
    `tools=` argument for a template that prints tools itself; rewritten by the convention otherwise (tools
    then None: they are in the system turn)."""
    if not has_tools(messages, tools):
        return messages, None
    if render_mode(template) == "native":
        return _native(messages), [t if "function" in t else {"type": "function", "function": t}
                                   for t in tools or []] or None
    return _convention(messages, tools), None


_HERMES = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)


def _call(obj) -> dict | None:
    """An OpenAI call (without id) from a parsed `{"name", "arguments" | "parameters"}` object, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    try:
        arguments = arguments_object(arguments)
    except (ValueError, TypeError):
        return None
    return {"type": "function", "function": {"name": obj["name"],
                                             "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_reply(text: str, style: Style = "hermes") -> tuple[str | None, list[dict] | None]:
    """(content, calls) of a generated reply. calls is None when the reply makes no call, or when what looks
    like a call does not parse (then the whole text is the content, as written); content is None when the
    reply is nothing but calls."""
    if style == "json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, None
        try:
            call = _call(json.loads(body))
        except ValueError:
            return text, None
        return (None, [call]) if call else (text, None)
    if CALL_OPEN not in text:
        return text, None
    calls = []
    for match in _HERMES.finditer(text):
        try:
            call = _call(json.loads(match.group(1)))
        except ValueError:
            return text, None
        if call is None:
            return text, None
        calls.append(call)
    rest = _HERMES.sub("", text)
    if not calls or CALL_OPEN in rest or CALL_CLOSE in rest:  # an unclosed or stray tag: not a clean call
        return text, None
    return rest.strip() or None, calls


def rendering(template: str) -> dict:
    """How `template` renders tools, as run.json records it for a run trained on tool data (`RunInfo.tools`):
    `{"mode": "native" | "convention", "style": "hermes" | "json"}`."""
    return {"mode": render_mode(template), "style": call_style(template)}


def with_ids(calls: list[dict] | None) -> list[dict] | None:
    """Parsed calls (`parse_reply`) with the unique `id` each OpenAI call carries, which its `tool` result
    answers with `tool_call_id`."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", **call} for call in calls] if calls else calls

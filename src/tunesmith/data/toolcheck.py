"""Tool-calling data: definitions, calls and results, read and checked against each other.

`parse_tools` reads a record's tool definitions into OpenAI's shape; `Calls` follows one record's calls and
results in order, checking each against what came before.

A call must name a defined function and carry a JSON object of arguments, a result must answer an earlier
call, and a definition's `parameters` must be a JSON schema (jsonschema's meta-schema says); arguments that
break their function's schema are a warning, not an error.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any

from .jsonparse import parse_json
from .problems import Issues, json_type, quote, text_field
from .tools import function_of


def parse_tools(obj: dict, issues: Issues) -> list[dict] | None:
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
        issues.append((key, f"{key} must be a list, got {json_type(value)}"))
        return None
    tools, names = [], set()
    for i, entry in enumerate(value):
        tool = _tool(entry, f"{key}[{i}]", issues)
        if tool is not None:
            name = tool["function"]["name"]
            if name in names:
                issues.append((f"{key}[{i}]", f"function {quote(name)} is defined twice"))
            names.add(name)
            tools.append(tool)
    return tools


def _tool(entry: Any, where: str, issues: Issues) -> dict | None:
    """One tools entry as `{"type": "function", "function": {...}}`. Also read: a bare function object (the
    `functions` spelling, LLaMA-Factory) and the Responses API's flat `{"type": "function", "name", ...}`."""
    if not isinstance(entry, dict):
        issues.append((where, f"a tools entry must be an object, got {json_type(entry)}"))
        return None
    if entry.get("type", "function") != "function":
        issues.append((f"{where}.type", f"only function tools are supported, got type {quote(entry['type'])}"))
        return None
    function, where = ((entry["function"], f"{where}.function") if "function" in entry
                       else ({k: v for k, v in entry.items() if k != "type"}, where))
    if not isinstance(function, dict):
        issues.append((where, f"function must be an object, got {json_type(function)}"))
        return None
    name = text_field(function, "name", issues, where)
    text_field(function, "description", issues, where, optional=True, allow_empty=True)
    if function.get("parameters") is not None:
        issues.extend(parameters_problems(function["parameters"], f"{where}.parameters"))
    return None if name is None else {"type": "function", "function": function}


def parameters_problems(parameters: Any, where: str) -> Issues:
    """(field, why) for a function's `parameters` that is not a JSON schema of an object: the one check of a tool
    definition, for data files (`data validate`) and for requests (the server's 400) alike."""
    issues: Issues = []
    if not isinstance(parameters, dict):
        issues.append((where, f"parameters must be a JSON schema object, got {json_type(parameters)}"))
        return issues
    _, error = _schema(json.dumps(parameters, sort_keys=True))
    if error:
        path, message = error
        issues.append((where + _field_path(path), message))
    elif parameters.get("type", "object") != "object":
        issues.append((f"{where}.type", "parameters must describe an object (arguments always are one), got type "
                                        f"{quote(parameters['type'])}"))
    return issues


@functools.lru_cache(maxsize=1024)
def _schema(text: str) -> tuple[Any, tuple[list, str] | None]:
    """(a validator, None) for a JSON schema given as JSON text, else (None, (path in it, why not)) when its
    own meta-schema rejects it. Cached: a file usually repeats the same tools in every record."""
    from jsonschema import Draft202012Validator, exceptions, validators  # lazily: only tool data needs it

    schema = json.loads(text)
    if not isinstance(schema.get("$schema", ""), str):  # validator_for() would fail on it with a TypeError
        return None, (["$schema"], f"parameters is not a valid JSON schema: $schema must be a string (the URI "
                                   f"of a JSON schema draft), got {json_type(schema['$schema'])}")
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
        issues.append((where, f"arguments must be a JSON object string, got {json_type(value)}"))
        return None
    try:
        parsed = parse_json(value)
    except json.JSONDecodeError as err:
        issues.append((where, f"arguments must be a JSON object string, but it is not JSON: {err.msg} "
                              f"(column {err.colno})"))
        return None
    if not isinstance(parsed, dict):
        issues.append((where, f"arguments must be a JSON object string, got a JSON {json_type(parsed)}"))
        return None
    return value, parsed


class Calls:
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
            issues.append((f"{where}.tool_calls", f"tool_calls must be a list, got {json_type(listed)}"))
            return None
        return [self.listed(call, f"{where}.tool_calls[{i}]", issues) for i, call in enumerate(listed)]

    def of_turn(self, turn: dict, where: str, issues: Issues) -> list[dict]:
        """A ShareGPT `function_call` turn's calls: its value is the JSON text of one `{"name", "arguments"}`
        object or of a list of them (parallel calls), as LLaMA-Factory writes them."""
        text = text_field(turn, "value", issues, where, empty="empty function call")
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
                                             f"non-empty list of them, got {json_type(value)}"))
        return []

    def listed(self, call: Any, where: str, issues: Issues) -> dict | None:
        """An entry of OpenAI's `tool_calls`: `{"id", "type": "function", "function": {"name", "arguments"}}`."""
        if not isinstance(call, dict):
            issues.append((where, f"a tool call must be an object, got {json_type(call)}"))
            return None
        if call.get("type", "function") != "function":
            issues.append((f"{where}.type", f"only function calls are supported, got type {quote(call['type'])}"))
        return self.call(call.get("function"), call.get("id"), f"{where}.function", issues, id_at=f"{where}.id")

    def call(self, function: Any, call_id: Any, where: str, issues: Issues, id_at: str = "") -> dict | None:
        """One call of `function` (`{"name", "arguments"}` at `where`), checked and recorded as waiting."""
        if not isinstance(function, dict):
            issues.append((where, f"function must be an object, got {json_type(function)}"))
            return None
        name = text_field(function, "name", issues, where)
        arguments = _arguments(function.get("arguments"), f"{where}.arguments", issues)
        if call_id is None:
            call_id = next(f"call_{n}" for n in itertools.count(len(self.names)) if f"call_{n}" not in self.names)
        elif not isinstance(call_id, str) or not call_id.strip():
            issues.append((id_at, f"id must be a non-empty string, got {quote(call_id)}"))
        elif call_id in self.names:
            issues.append((id_at, f"id {quote(call_id)} is already an earlier call's"))
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
            known = ", ".join(map(quote, self.functions))
            issues.append((f"{where}.name", f"a call to {quote(name)}, which is not in tools "
                                            f"({'tools: ' + known if known else 'the record has none'})"))
        elif arguments and isinstance(function.get("parameters"), dict):
            broken = _schema_break(function["parameters"], arguments[1])
            if broken:  # a warning: real data has some, and the call is still worth learning
                issues.warnings.append((f"{where}.arguments", f"arguments do not match the parameters of "
                                        f"{quote(name)}: {broken} (allowed, but the model learns a call the "
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
            issues.append((where, f"tool_call_id must be a string, got {json_type(call_id)}"))
            return None
        elif call_id not in self.names:
            known = f" (earlier calls: {', '.join(map(quote, self.names))})" if self.names else ""
            issues.append((where, f"tool_call_id {quote(call_id)} answers no earlier call{known}"))
            return None
        if call_id in self.waiting:
            self.waiting.remove(call_id)
        return call_id

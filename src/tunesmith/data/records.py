"""JSON records into internal records, one `parse_<shape>(obj, issues)` per JSON shape.

The shapes: OpenAI chat, completion, alpaca, ShareGPT, text, classification and tagging (preference data:
`preference.py`, over `parse_message`); each parser notes
what is wrong, by field, in `issues`. An OpenAI chat assistant message may carry `reasoning_content` (a thinking
model's reasoning, as DeepSeek's and vLLM's APIs return it); blank reasoning is the same as none.

The internal shapes are documented in `formats`; chat records with tools go through `toolcheck`.
"""

from __future__ import annotations

from typing import Any, Callable

from .problems import Issues, json_type, list_field, quote, text_field
from .toolcheck import Calls, parse_tools


ROLES = ("system", "user", "assistant", "tool")
# ShareGPT dumps name the speaker after the product that wrote the turn; LLaMA-Factory's tool format adds
# `function_call` (the assistant's calls, as JSON) and `observation` (a tool's result).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool"}


# OpenAI's fine-tuning format accepts empty system and user content, so tunesmith does too, with a warning;
# an empty assistant message is still an error: it is the training target.
_ALLOWED_BUT = {"system": "(allowed, but it renders as an empty system turn; drop the message if none is meant)",
                "user": "(allowed, but the reply that follows then answers nothing)"}
_EMPTY_TURN = {role: f"empty {role} content {why}" for role, why in _ALLOWED_BUT.items()}


def _one_of(obj: dict, key: str, where: str, issues: Issues, known, what: str, expected: str,
            fold: Callable[[str], str] = str) -> str | None:
    """fold(obj[key]) if it is a string that folds to one of `known`, else None with an issue."""
    value = obj.get(key)
    if value is None:
        issues.append((f"{where}.{key}", f"missing {key}"))
    elif not isinstance(value, str):
        issues.append((f"{where}.{key}", f"{key} must be a string, got {json_type(value)}"))
    elif fold(value) not in known:
        issues.append((f"{where}.{key}", f"unknown {what} {quote(value)} (expected {expected})"))
    else:
        return fold(value)
    return None


def _role(m: dict, where: str, issues: Issues) -> str | None:
    role = _one_of(m, "role", where, issues, (*ROLES, "function"), "role", "system, user, assistant or tool")
    if role is not None and role != "assistant" and (m.get("tool_calls") or m.get("function_call")):
        issues.append((f"{where}.tool_calls", f"only assistant messages make calls, not {quote(role)}"))
    return "tool" if role == "function" else role  # `function`: OpenAI's older spelling of a tool's result


def parse_message(m: Any, where: str, issues: Issues, calls: Calls) -> dict | None:
    """One OpenAI chat message at `where` (e.g. "messages[2]"), its calls checked against `calls`."""
    if not isinstance(m, dict):
        issues.append((where, f"message must be an object, got {json_type(m)}"))
        return None
    role = _role(m, where, issues)
    tool_calls = calls.of_message(m, where, issues) if role == "assistant" else None
    if tool_calls or role == "tool":  # a call turn needs no text, and a tool may return an empty result
        content = text_field(m, "content", issues, where, optional=bool(tool_calls), allow_empty=True)
    else:
        content = text_field(m, "content", issues, where, empty="empty message", warn_empty=_EMPTY_TURN.get(role))
    message = {"role": role, "content": content}
    if tool_calls:
        message.update(content=content if content and content.strip() else None, tool_calls=tool_calls)
    elif role == "tool":
        name = text_field(m, "name", issues, where, optional=True)  # the older spelling's: which function answered
        message["tool_call_id"] = calls.answer(m.get("tool_call_id"), name, f"{where}.tool_call_id", issues)
        if name is not None:
            message["name"] = name
    if m.get("reasoning_content") is not None:  # what a thinking model reasoned before this reply (DeepSeek, vLLM)
        reasoning = text_field(m, "reasoning_content", issues, where, allow_empty=True)
        if role not in (None, "assistant"):
            issues.append((f"{where}.reasoning_content",
                           f"reasoning_content is only allowed on assistant messages, not {quote(role)}"))
        elif reasoning and reasoning.strip():
            message["reasoning_content"] = reasoning
    if "weight" in m:  # OpenAI's fine-tuning format: 0 = shown to the model but not learned
        weight = message["weight"] = m["weight"]
        if role != "assistant":
            issues.append((f"{where}.weight", f"weight is only allowed on assistant messages, not {quote(role)}"))
        elif type(weight) is not int or weight not in (0, 1):
            issues.append((f"{where}.weight", f"weight must be 0 or 1, got {quote(weight)}"))
    return message


def _require_learnable(messages: list, field: str, issues: Issues) -> None:
    if not issues and not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        issues.append((field, "no assistant turn to learn from"))


def _system(obj: dict, issues: Issues) -> list[dict]:
    system = text_field(obj, "system", issues, optional=True, allow_empty=True)
    return [{"role": "system", "content": system}] if system and system.strip() else []


def parse_chat(obj: dict, issues: Issues) -> dict | None:
    messages = list_field(obj, "messages", issues)
    if messages is None:
        return None
    tools = parse_tools(obj, issues)
    calls = Calls(tools)
    out = [parse_message(m, f"messages[{i}]", issues, calls) for i, m in enumerate(messages)]
    _require_learnable(out, "messages", issues)
    return {"messages": out, "tools": tools} if tools else {"messages": out}


def parse_completion(obj: dict, issues: Issues) -> dict:
    return {"prompt": text_field(obj, "prompt", issues, allow_empty=True),
            "completion": text_field(obj, "completion", issues)}


def _history(obj: dict, issues: Issues) -> list[dict]:
    """LLaMA-Factory's alpaca `history`: earlier turns as [user, assistant] pairs."""
    history = obj.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        issues.append(("history", f"history must be a list, got {json_type(history)}"))
        return []
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            issues.append((f"history[{i}]", "history turn must be a [user, assistant] pair of strings"))
            continue
        if not pair[1].strip():
            issues.append((f"history[{i}][1]", "empty message"))
        elif not pair[0].strip():
            issues.warnings.append((f"history[{i}][0]", _EMPTY_TURN["user"]))
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def parse_alpaca(obj: dict, issues: Issues) -> dict:
    instruction = text_field(obj, "instruction", issues, allow_empty=True)
    extra = text_field(obj, "input", issues, optional=True, allow_empty=True)
    output = text_field(obj, "output", issues)
    parts = [part for part in (instruction, extra) if part and part.strip()]
    if instruction is not None and not parts:
        issues.warnings.append(("instruction", f"empty instruction and input: the user turn is empty "
                                               f"{_ALLOWED_BUT['user']}"))
    user = "\n\n".join(parts) or instruction
    return {"messages": _system(obj, issues) + _history(obj, issues)
            + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def parse_sharegpt(obj: dict, issues: Issues) -> dict | None:
    turns = list_field(obj, "conversations", issues)
    messages = _system(obj, issues)
    if turns is None:
        return None
    tools = parse_tools(obj, issues)
    calls = Calls(tools)
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            issues.append((where, f"turn must be an object, got {json_type(turn)}"))
            continue
        speaker = _one_of(turn, "from", where, issues, SHAREGPT_ROLES, "speaker",
                          f"one of {', '.join(SHAREGPT_ROLES)}", fold=str.lower)
        role = SHAREGPT_ROLES.get(speaker)
        if speaker == "function_call":
            messages.append({"role": role, "content": None, "tool_calls": calls.of_turn(turn, where, issues)})
        elif role == "tool":  # an observation answers the oldest call still waiting (ShareGPT has no ids)
            messages.append({"role": role, "content": text_field(turn, "value", issues, where, allow_empty=True),
                             "tool_call_id": calls.answer(None, None, where, issues)})
        else:
            content = text_field(turn, "value", issues, where, empty="empty message", warn_empty=_EMPTY_TURN.get(role))
            messages.append({"role": role, "content": content})
    _require_learnable(messages, "conversations", issues)
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


def parse_text(obj: dict, issues: Issues) -> dict:
    return {"prompt": "", "completion": text_field(obj, "text", issues)}


def parse_classification(obj: dict, issues: Issues) -> dict:
    text, label = text_field(obj, "text", issues), obj.get("label")
    if label is None:
        issues.append(("label", "missing label"))
    elif isinstance(label, bool) or not isinstance(label, (str, int)):
        issues.append(("label", f"label must be a string or an integer, got {json_type(label)}"))
    elif not str(label).strip():
        issues.append(("label", "empty label"))
    return {"text": text, "label": str(label)}


def _strings(obj: dict, key: str, issues: Issues) -> list[str] | None:
    values = list_field(obj, key, issues)
    bad = next((i for i, v in enumerate(values or []) if not isinstance(v, str)), None)
    if bad is None:
        return values
    hint = " (integer class ids need their tag names, e.g. 'B-PER')" if isinstance(values[bad], int) else ""
    issues.append((f"{key}[{bad}]", f"{key} must be strings, got {json_type(values[bad])}{hint}"))
    return None


def parse_tagging(obj: dict, issues: Issues) -> dict:
    key = "tags" if "tags" in obj else "ner_tags"  # ner_tags: Hugging Face datasets' name for them
    tokens, tags = _strings(obj, "tokens", issues), _strings(obj, key, issues)
    if tokens is not None and tags is not None and len(tokens) != len(tags):
        issues.append((key, f"{len(tags)} tags for {len(tokens)} tokens (they must pair up one to one)"))
    return {"tokens": tokens, "tags": tags}

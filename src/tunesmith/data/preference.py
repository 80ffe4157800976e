"""Preference data: pairs of a better and a worse reply to one prompt (DPO, ORPO) and unpaired feedback, one reply
marked good or bad (KTO), read into tunesmith's two preference record shapes, and converted between the formats.

The shapes are TRL's, so a TRL preference file already holds them:
- pair:     {"prompt", "chosen", "rejected", "tools"?}
- unpaired: {"prompt", "completion", "label": true | false, "tools"?}
A record is conversational or plain text, never a mix (TRL's `is_conversational`): the prompt a list of chat
messages and each reply a list of assistant messages (tool results may sit between an assistant's calls and its
answer), or all of them strings. What a model learns from, and is compared on, is the reply alone: `as_sft` spells
prompt + reply as the chat or completion record the tokenizer masks, the prompt's own assistant turns as context.

Read here: TRL's pairs with an explicit prompt or an implicit one (chosen and rejected as whole conversations or
texts; the prompt is what they begin with alike, as TRL's `extract_prompt` takes it), OpenAI's preference
fine-tuning format (`input: {messages, tools?}`, `preferred_output`, `non_preferred_output`) and TRL's unpaired
format. Problems are noted by field, as `records.py` does.
"""

from __future__ import annotations

import copy

from .problems import Issues, json_type, list_field, quote, text_field
from .records import parse_message
from .toolcheck import Calls, parse_tools

REPLY_ROLES = ("assistant", "tool")


def _mixed(key: str, value, other: str, other_value) -> str:
    def kind(v) -> str:
        return "a list of messages" if isinstance(v, list) else "text" if isinstance(v, str) else json_type(v)

    return (f"{key} is {kind(value)} but {other} is {kind(other_value)}: a record is conversational (every field a "
            "list of messages) or plain text (every field a string), not both")


def is_conversational(record: dict) -> bool:
    """Whether a preference record's fields are message lists (else strings)."""
    return isinstance(record["prompt"], list)


# ---------------------------------------------------------------------------------------------------------
# the fields: prompts and replies, as messages or text
# ---------------------------------------------------------------------------------------------------------

def _messages(value, where: str, issues: Issues, calls: Calls, offset: int = 0) -> list[dict]:
    """The messages of a list at `where`, numbered from `offset` in messages (an implicit prompt's reply is the
    tail of the list the user wrote, and is named by its place there)."""
    return [parse_message(m, f"{where}[{offset + i}]", issues, calls) for i, m in enumerate(value)]


def _check_reply(reply: list[dict], where: str, issues: Issues, offset: int = 0) -> None:
    """A reply is the assistant's: its turns (and the tool results its calls get), ending with an assistant
    message, one of them learnable."""
    if not reply:
        issues.append((where, f"nothing in {where} after the prompt that both replies begin with: the replies are "
                              "the messages after it"))
        return
    if any(m is None or m["role"] is None for m in reply):  # a message already noted as unreadable
        return
    for i, message in enumerate(reply):
        if message["role"] not in REPLY_ROLES:
            issues.append((f"{where}[{offset + i}].role", f"a reply holds the assistant's turns (and the results of its "
                                                         f"tool calls), not a {message['role']} message; put the "
                                                         "conversation before the reply in prompt"))
            return
    if reply[-1]["role"] != "assistant":
        issues.append((where, f"a reply ends with an assistant message, but {where} ends with a {reply[-1]['role']} "
                              "message"))
    elif not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in reply):
        issues.append((where, "no assistant turn to learn from (every one has weight 0)"))


def _reply(obj: dict, key: str, issues: Issues, calls: Calls, where: str | None = None) -> list[dict] | None:
    """A conversational reply given on its own (`chosen` beside an explicit prompt, `preferred_output`)."""
    value = list_field(obj, key, issues)
    if value is None:
        return None
    reply = _messages(value, where or key, issues, calls)
    _check_reply(reply, where or key, issues)
    return reply


def _differ(chosen, rejected, issues: Issues, key: str = "rejected", other: str = "chosen") -> None:
    if chosen is not None and chosen == rejected:
        issues.append((key, f"the same reply as {other}: a pair needs two different replies"))


def _common_messages(a: list[dict], b: list[dict]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _common_text(a: str, b: str) -> int:
    """Where texts `a` and `b` part; a space just before stays with the replies (TRL's extract_prompt)."""
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return at - 1 if at and a[at - 1] == " " else at


# ---------------------------------------------------------------------------------------------------------
# TRL's pairs
# ---------------------------------------------------------------------------------------------------------

def parse_pair(obj: dict, issues: Issues) -> dict | None:
    """TRL's preference record: `prompt` (absent: implicit, the start both replies share), `chosen`, `rejected`."""
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
        return _conversation_pair(obj, issues)
    if isinstance(obj.get("prompt"), list):
        issues.append(("prompt", _mixed("prompt", obj["prompt"], "chosen", obj.get("chosen"))))
        return None
    chosen, rejected = text_field(obj, "chosen", issues), text_field(obj, "rejected", issues)
    if obj.get("prompt") is not None:
        prompt = text_field(obj, "prompt", issues, allow_empty=True)
    elif chosen is None or rejected is None:
        prompt = ""
    else:  # implicit: the text both replies begin with
        at = _common_text(chosen, rejected)
        prompt, chosen, rejected = chosen[:at], chosen[at:], rejected[at:]
        for key, reply in (("chosen", chosen), ("rejected", rejected)):
            if not reply.strip():
                issues.append((key, f"nothing in {key} after the text both replies begin with (the prompt)"))
    _differ(chosen, rejected, issues)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _conversation_pair(obj: dict, issues: Issues) -> dict | None:
    for key, other in (("chosen", "rejected"), ("rejected", "chosen")):
        if not isinstance(obj.get(key), list):
            issues.append((key, f"missing {key}" if obj.get(key) is None else _mixed(other, obj[other], key, obj[key])))
            return None
    tools = parse_tools(obj, issues)
    calls = Calls(tools)
    if isinstance(obj.get("prompt"), list):
        prompt = _messages(list_field(obj, "prompt", issues) or [], "prompt", issues, calls)
        chosen = _reply(obj, "chosen", issues, copy.deepcopy(calls))
        rejected = _reply(obj, "rejected", issues, copy.deepcopy(calls))
    else:
        # Implicit: whole conversations that share their start (TRL's extract_prompt; Anthropic HH as TRL reads
        # it, where a text `prompt` beside them is ignored). Each is read from the start, with its own calls.
        whole = {key: _messages(obj[key], key, issues, copy.deepcopy(calls)) for key in ("chosen", "rejected")}
        at = _common_messages(whole["chosen"], whole["rejected"])
        prompt, chosen, rejected = whole["chosen"][:at], whole["chosen"][at:], whole["rejected"][at:]
        _check_reply(chosen, "chosen", issues, at)
        _check_reply(rejected, "rejected", issues, at)
    _differ(chosen, rejected, issues)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **({"tools": tools} if tools else {})}


# ---------------------------------------------------------------------------------------------------------
# OpenAI's preference fine-tuning format
# ---------------------------------------------------------------------------------------------------------

def parse_openai_pair(obj: dict, issues: Issues) -> dict | None:
    """`{"input": {"messages", "tools"?}, "preferred_output": [assistant], "non_preferred_output": [assistant]}`."""
    given = obj.get("input")
    if not isinstance(given, dict):
        issues.append(("input", "missing input" if given is None else
                       f"input must be an object with messages (and tools), got {json_type(given)}"))
        return None
    inner = Issues()  # the input's own problems, named under `input.`
    tools = parse_tools(given, inner)
    issues.extend((f"input.{field}", message) for field, message in inner)
    issues.warnings.extend((f"input.{field}", message) for field, message in inner.warnings)
    calls = Calls(tools)
    prompt = _messages(list_field(given, "messages", issues, "input") or [], "input.messages", issues, calls)
    chosen = _reply(obj, "preferred_output", issues, copy.deepcopy(calls))
    rejected = _reply(obj, "non_preferred_output", issues, copy.deepcopy(calls))
    _differ(chosen, rejected, issues, "non_preferred_output", "preferred_output")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **({"tools": tools} if tools else {})}


# ---------------------------------------------------------------------------------------------------------
# TRL's unpaired feedback (KTO)
# ---------------------------------------------------------------------------------------------------------

def parse_unpaired(obj: dict, issues: Issues) -> dict | None:
    """TRL's unpaired record: `prompt`, `completion` (one reply) and `label` (true: a good reply, false: a bad one)."""
    label = obj.get("label")
    if label is None:
        issues.append(("label", "missing label (true for a good reply, false for a bad one)"))
    elif not isinstance(label, bool):
        issues.append(("label", f"label must be true or false (a good or a bad reply), got {quote(label)}"))
    tools = parse_tools(obj, issues)
    conversational = isinstance(obj.get("completion"), list)
    if obj.get("prompt") is not None and isinstance(obj["prompt"], list) != conversational \
            and obj.get("completion") is not None:
        issues.append(("prompt", _mixed("prompt", obj["prompt"], "completion", obj["completion"])))
        return None
    if not conversational:
        return {"prompt": text_field(obj, "prompt", issues, allow_empty=True),
                "completion": text_field(obj, "completion", issues), "label": label}
    calls = Calls(tools)
    prompt = _messages(list_field(obj, "prompt", issues) or [], "prompt", issues, calls)
    completion = _reply(obj, "completion", issues, calls)
    return {"prompt": prompt, "completion": completion, "label": label, **({"tools": tools} if tools else {})}


# ---------------------------------------------------------------------------------------------------------
# conversions and the records the tokenizer sees
# ---------------------------------------------------------------------------------------------------------

def _as_messages(prompt, reply) -> tuple[list[dict], list[dict]]:
    """A text prompt and reply as one user and one assistant message (an empty prompt: no user message)."""
    if isinstance(prompt, list):
        return prompt, reply
    return ([{"role": "user", "content": prompt}] if prompt else []), [{"role": "assistant", "content": reply}]


def to_openai(pair: dict) -> dict:
    """A pair in OpenAI's preference fine-tuning format (text fields become a user and an assistant message)."""
    prompt, chosen = _as_messages(pair["prompt"], pair["chosen"])
    _, rejected = _as_messages(pair["prompt"], pair["rejected"])
    given = {"messages": prompt, **({"tools": pair["tools"]} if pair.get("tools") else {})}
    return {"input": given, "preferred_output": chosen, "non_preferred_output": rejected}


def to_unpaired(pair: dict) -> list[dict]:
    """A pair as two unpaired records: the chosen reply good (label true), the rejected one bad."""
    tools = {"tools": pair["tools"]} if pair.get("tools") else {}
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, **tools},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False, **tools}]


def chosen_chat(pair: dict) -> dict:
    """A pair's prompt and chosen reply as one chat record (supervised fine-tuning on the preferred replies)."""
    prompt, chosen = _as_messages(pair["prompt"], pair["chosen"])
    return {"messages": prompt + chosen, **({"tools": pair["tools"]} if pair.get("tools") else {})}


def as_sft(record: dict, reply: str) -> dict:
    """The prompt and one reply (`reply`: "chosen", "rejected" or "completion") as the chat or completion record
    whose learnable tokens are that reply's: the prompt's assistant turns are context (weight 0)."""
    if not is_conversational(record):
        return {"prompt": record["prompt"], "completion": record[reply]}
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in record["prompt"]]
    return {"messages": context + record[reply], **({"tools": record["tools"]} if record.get("tools") else {})}

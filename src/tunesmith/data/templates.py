"""Prompt building: chat rendering through the model's own chat template (with small named fallbacks), with
the exact place of each message's content in the rendering, and Jinja2 prompt templates with zero- or k-shot
exemplars for the completion format."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import AfterValidator, JsonValue

from ..errors import TunesmithError
from .tools import for_template

# ---------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------

# Fallbacks for tokenizers that ship no chat template. `plain` works with any tokenizer that has an EOS
# token: the EOS ends every assistant turn so a trained model learns to stop.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'tool' %}{{ 'Tool: ' + message['content'] + '\n\n' }}"
        "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}

# A fallback is only right when its end-of-turn marker is the token generation stops on.
_FALLBACK_BY_EOS = {"<|im_end|>": "chatml", "<|eot_id|>": "llama3"}


def chat_template_for(tokenizer, name: str | None = None) -> str:
    """The Jinja chat template to render with: `name` (a key of CHAT_TEMPLATES or a literal template),
    else the tokenizer's own, else the fallback whose end-of-turn marker is the EOS token, else `plain`."""
    if name:
        return CHAT_TEMPLATES.get(name, name)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    return CHAT_TEMPLATES[_FALLBACK_BY_EOS.get(tokenizer.eos_token, "plain")]


# What of a message reaches the template: per-message training fields such as `weight` are ours. Tool fields
# and reasoning go only where they hold something: Llama 3.1's template takes any message with a `tool_calls`
# key, even None, for a call turn.
_TEMPLATE_FIELDS = ("role", "content")
_OPTIONAL_FIELDS = ("tool_calls", "tool_call_id", "name", "reasoning_content")

# Names apply_chat_template takes itself, or gives the template: a chat template kwarg of the same name would
# collide with them (a TypeError) or replace the conversation.
RESERVED_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def kwargs_problem(kwargs: Mapping | None) -> str | None:
    """Why `kwargs` cannot be chat template variables, or None: a name tunesmith or transformers sets itself."""
    taken = sorted(set(kwargs or ()) & RESERVED_KWARGS)
    if taken:
        return (f"chat_template_kwargs cannot set {', '.join(taken)}: tunesmith sets "
                f"{'it' if len(taken) == 1 else 'them'} itself; pass template variables such as enable_thinking")
    return None


def _checked_kwargs(kwargs: dict) -> dict:
    if problem := kwargs_problem(kwargs):
        raise ValueError(problem)
    return kwargs


# Chat template variables as the configs and the server's requests take them: JSON values, no reserved name.
TemplateKwargs = Annotated[dict[str, JsonValue], AfterValidator(_checked_kwargs)]


def merge_kwargs(*layers: Mapping | None) -> dict | None:
    """Chat template variables from several sources, later ones winning key by key (vLLM merges a request's
    over the server's defaults so); None when there are none."""
    return {key: value for layer in layers for key, value in (layer or {}).items()} or None


class ChatTemplateError(TunesmithError, ValueError):
    """A conversation the chat template refuses (its own `raise_exception`, e.g. Llama 3.1's one call per turn)."""


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                chat_template: str | None = None, tools: list[dict] | None = None,
                chat_template_kwargs: Mapping | None = None) -> str:
    """Render messages to text with the chosen chat template (see `chat_template_for`). Tool definitions,
    calls and results reach it as `data/tools.py` says for that template; an assistant message's
    `reasoning_content` as it is (data/reasoning.py); `chat_template_kwargs` are extra template variables
    (`enable_thinking`), as transformers' apply_chat_template and vLLM take them."""
    if problem := kwargs_problem(chat_template_kwargs):
        raise ChatTemplateError(problem)
    template = chat_template_for(tokenizer, chat_template)
    messages, tools = for_template(messages, tools, template)
    clean = [{**{k: m[k] for k in _TEMPLATE_FIELDS if k in m}, **{k: m[k] for k in _OPTIONAL_FIELDS if m.get(k)}}
             for m in messages]
    extra = {**(chat_template_kwargs or {}), **({"tools": tools} if tools else {})}
    try:
        return tokenizer.apply_chat_template(
            clean, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template, **extra)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"the chat template refuses this conversation: {err}") from None


# Placeholders for message content: private-use characters have no case and no whitespace, so they pass
# through `| upper`, `| trim` and the like unchanged, and no real text contains them by accident.
_OPEN, _CLOSE = "\ue000", "\ue001"


def render_chat_spans(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                      chat_template: str | None = None, tools: list[dict] | None = None,
                      chat_template_kwargs: Mapping | None = None) -> tuple[str, list[tuple[int, int, int]] | None]:
    """`render_chat`, plus where each message's content sits in the text: `(message index, start, end)` for
    every place the template prints it, in text order. None when the template changes content beyond
    trimming whitespace (e.g. drops old reasoning), so the spans cannot be known exactly.

    The spans come from positions, never from searching the text for the content (a search can match the
    template's own text, e.g. a default system prompt's `<|im_end|>`): the conversation is rendered a second
    time with a unique placeholder for each content, the template's own text is what lies between the
    placeholders, and the real rendering must be exactly those pieces with each content put back, as given,
    stripped where the template trims, or JSON-escaped where it prints content through `tojson`."""
    options = dict(add_generation_prompt=add_generation_prompt, chat_template=chat_template, tools=tools,
                   chat_template_kwargs=chat_template_kwargs)
    text = render_chat(tokenizer, messages, **options)
    contents = [m.get("content") for m in messages]
    tag = _OPEN
    while any(tag in c for c in contents if isinstance(c, str)):  # no content holds the tag: no collision
        tag += _OPEN
    # A call turn without text keeps its empty content: a placeholder there would make templates that print
    # content only when there is some (`{% if message.content %}`, Qwen2.5) render another conversation.
    marked = [{**m, "content": f"{tag}{i}{_CLOSE}"} if _printed_content(m) else m for i, m in enumerate(messages)]
    skeleton = render_chat(tokenizer, marked, **options)
    # pieces = [template text, message index, template text, message index, ..., template text]
    pieces = re.split(f"{re.escape(tag)}([0-9]+){re.escape(_CLOSE)}", skeleton)
    return text, _align(text, pieces, contents)


def _printed_content(message: dict) -> bool:
    content = message.get("content")
    return isinstance(content, str) and bool(content or not message.get("tool_calls"))


def _align(text: str, pieces: list[str], contents: list) -> list[tuple[int, int, int]] | None:
    if not text.startswith(pieces[0]):
        return None
    spans, at = [], len(pieces[0])
    for index, after in zip(pieces[1::2], pieces[2::2]):
        index = int(index)
        if index >= len(contents) or not isinstance(contents[index], str):
            return None
        content = contents[index]
        # As given first, then as Jinja's `trim` (str.strip) and its one-sided forms would print it, then as
        # `tojson` prints a string, inside its quotes (Llama 3.1 prints tool results so).
        forms = (content, content.strip(), content.lstrip(), content.rstrip(),
                 json.dumps(content, ensure_ascii=False)[1:-1])
        for printed in dict.fromkeys(forms):
            if text.startswith(printed, at) and text.startswith(after, at + len(printed)):
                break
        else:
            return None
        spans.append((index, at, at + len(printed)))
        at += len(printed) + len(after)
    return spans if at == len(text) else None


def template_fingerprint(template: str) -> str:
    """A short stable hash of a chat template, saved with trained runs so a mismatch can be detected."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------------------

# Prompt templates come from users and config files, so they render in Jinja's sandbox. StrictUndefined turns
# a misspelled field into an error instead of a silently empty string in every prompt.
_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


class TemplateError(TunesmithError, ValueError):
    """A prompt template that does not parse, or that needs a field a record lacks."""


def _short(source: str, limit: int = 60) -> str:
    return repr(source if len(source) <= limit else source[: limit - 3] + "...")


def _compile(source: str, role: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"The {role} {_short(source)} has a Jinja syntax error on line {e.lineno}: "
                            f"{e.message}.") from e


@dataclass
class PromptTemplate:
    """A completion-format prompt with named fields, e.g. `"Review: {{ text }}\\nSentiment:"`, that can also
    be laid out as chat messages. Shots are exemplar records shown with their answers before the query."""

    template: str
    """Jinja2 for the query, with fields taken from the record."""
    answer: str = ""
    """Jinja2 for an exemplar's answer, e.g. `" {{ label }}"`; needed only for k-shot prompts."""
    instruction: str = ""
    """Plain text placed before the shots and the query (the system message in chat format)."""
    separator: str = "\n\n"
    """Placed between the instruction, each shot and the query in completion format."""

    def __post_init__(self):
        # Compile up front so a broken template from a config fails at load time, not mid-evaluation. Plain
        # attributes rather than fields, so asdict() (config dumps) sees only the four user-facing strings.
        self._compiled = _compile(self.template, "prompt template")
        self._compiled_answer = _compile(self.answer, "answer template")

    def fields(self) -> set[str]:
        """The record fields the template and answer refer to."""
        return set().union(*(meta.find_undeclared_variables(_ENV.parse(s)) for s in (self.template, self.answer)))

    def _render(self, compiled: jinja2.Template, source: str, role: str, record: Mapping) -> str:
        try:
            return compiled.render(record)
        except jinja2.UndefinedError as e:
            keys = ", ".join(sorted(map(str, record))) or "(none)"
            raise TemplateError(f"The {role} {_short(source)} uses a field the record lacks ({e.message}); "
                                f"the record's fields are: {keys}.") from e
        except jinja2.exceptions.SecurityError as e:
            reason = str(e).rstrip(".")
            raise TemplateError(f"The {role} {_short(source)} does something the sandbox forbids: {reason}.") from e

    def render(self, record: Mapping) -> str:
        """The query text for one record."""
        return self._render(self._compiled, self.template, "prompt template", record)

    def render_answer(self, record: Mapping) -> str:
        """The answer text for one exemplar."""
        return self._render(self._compiled_answer, self.answer, "answer template", record)

    def _check_shots(self, shots: Sequence[Mapping]) -> None:
        if shots and not self.answer:
            raise TemplateError(f"The prompt template {_short(self.template)} was given shots but has no "
                                f"answer template; set `answer` (e.g. ' {{{{ label }}}}') to show their answers.")

    def prompt(self, record: Mapping, shots: Sequence[Mapping] = ()) -> str:
        """Completion format: instruction, each shot with its answer, then the query, joined by `separator`."""
        self._check_shots(shots)
        parts = [self.instruction] if self.instruction else []
        parts += [self.render(shot) + self.render_answer(shot) for shot in shots]
        parts.append(self.render(record))
        return self.separator.join(parts)

    def messages(self, record: Mapping, shots: Sequence[Mapping] = (), system: str | None = None) -> list[dict]:
        """Chat format: an optional system message (`instruction` unless `system` is given; "" means none),
        a user/assistant pair per shot, then the query as the last user message."""
        self._check_shots(shots)
        system = self.instruction if system is None else system
        msgs = [{"role": "system", "content": system}] if system else []
        for shot in shots:
            # The answer template's leading space suits completions (" positive"); a chat turn should not carry it.
            msgs += [{"role": "user", "content": self.render(shot)},
                     {"role": "assistant", "content": self.render_answer(shot).strip()}]
        msgs.append({"role": "user", "content": self.render(record)})
        return msgs


def select_shots(pool: Sequence[Mapping], k: int, *, strategy: Literal["first", "random"] = "first",
                 seed: int = 0, exclude: Mapping | None = None) -> list:
    """k exemplars from `pool`: the first k, or a seeded random sample. Records equal to `exclude` (the query
    itself) are never chosen, so a query never appears as its own shot."""
    if strategy not in ("first", "random"):
        raise TemplateError(f"Unknown shot selection strategy {strategy!r}; use 'first' or 'random'.")
    if k < 0:
        raise TemplateError(f"The number of shots must be 0 or more, not {k}.")
    candidates = [r for r in pool if exclude is None or r != exclude]
    if k > len(candidates):
        excluded = f" after excluding the query ({len(pool) - len(candidates)} removed)" if exclude is not None else ""
        raise TemplateError(f"Asked for {k} shots but the pool has only {len(candidates)} "
                         f"exemplar{'s' * (len(candidates) != 1)}{excluded}.")
    if strategy == "first":
        return candidates[:k]
    # A partial Fisher-Yates shuffle driven only by Random.random(): Python guarantees that method's sequence
    # for a given seed across versions, whereas random.sample/shuffle internals have changed before.
    rng = random.Random(seed)
    for i in range(k):
        j = i + int(rng.random() * (len(candidates) - i))
        candidates[i], candidates[j] = candidates[j], candidates[i]
    return candidates[:k]

"""Constrained decoding for OpenAI's `response_format`: `{"type": "json_object"}` and `{"type": "json_schema",
"json_schema": {"name": ..., "schema": {...}, "strict": true}}` become a per-row token mask, through llguidance
(chosen by measurement over xgrammar and outlines-core: benchmarks/grammar_choice.md).

The contract with the engine, per row and decode step:

    constraint = Constraint(tokenizer, response_format, vocab_size)  # vocab_size: the logits' width
    mask = constraint.allowed()        # torch.bool [vocab_size] on CPU, True = allowed; None = unconstrained
    if mask is not None:
        logits[~mask] = float("-inf")  # logits [vocab_size]; mask.to(logits.device) when they live elsewhere
    token = sample(logits)
    constraint.advance(token)          # False: the token broke the grammar (allowed() then raises)

EOS is allowed only once the JSON is complete, and then nothing else is, so a row ends with its own EOS or at
max_tokens (the JSON cut short, finish_reason "length", as with OpenAI). Tokens past the tokenizer's vocabulary
(lm_head padding) are never allowed. Some schemas llguidance accepts meet one of its limits only as the reply
goes (an anyOf of more than 2,000 objects once a key starts, a pattern such as `^a{100000}$` once the string
does): `allowed()` then raises `ConstraintFailed` and the engine ends the row with finish_reason "grammar_error",
never "stop" with JSON that does not validate. One that cannot even start (a `$ref` to itself) is refused when
it compiles. `allowed(row)` also takes the engine's row and ignores it, so a
Constraint is a `generation.params.TokenMask`, and `token_mask()` gives `SamplingParams.token_mask` its factory.

Costs: the tokenizer's byte table is built once per tokenizer (~0.5 s for a 49k vocabulary) and kept while the
tokenizer lives; each schema's grammar is compiled once, one compile at a time, and kept within a budget in bytes
(grammar_cache.py); `token_mask()` holds its compiled grammar, so each row starts from a copy of it (~10 us) and
nothing compiles on the engine's thread; a mask costs ~0.01-0.2 ms on CPU, far below a decode step.
`response_format_error()` checks a request up front and returns the sentence for a 400 on `response_format`.

Tool calls (tool_choice "required" or a named function) are forced the same way: `tool_call_grammar()` writes a
Lark grammar with each function's parameters as an inline `%json` schema, and a `Grammar` goes wherever a
response_format does (`Constraint`, `token_mask`)."""

from __future__ import annotations

import functools
import json
import threading
import weakref
from dataclasses import dataclass

from ..data.tools import CALL_CLOSE, CALL_OPEN
from ..errors import TunesmithError
from .grammar_cache import TEMPLATES, TEXTS, compiling, template_bytes
from .params import ConstraintFailed

# Whitespace between JSON tokens: one or two spaces, or one line break and up to 32 characters of indentation.
# That is compact and pretty-printed JSON alike, while llguidance's default ([ \t\r\n]+) lets a small model
# spend all of max_tokens on blank lines (measured with SmolLM2-135M: benchmarks/grammar_choice.md).
JSON_OPTIONS = {"whitespace_pattern": r"(?:[\x20\x09]{1,2}|\x0D?\x0A[\x20\x09]{0,32})"}
ANY_OBJECT = {"type": "object"}  # json_object mode: any JSON object, as OpenAI's JSON mode promises
SCHEMA_KEYS = {"name", "description", "schema", "strict"}


class ResponseFormatError(TunesmithError, ValueError):
    """A `response_format` this server cannot enforce; the message names the field and says what to change."""


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar built elsewhere (`tool_call_grammar`), enforced as is where a response_format goes."""

    text: str


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as error:  # a required dependency; this only trips in an environment set up by hand
        raise ImportError("response_format needs llguidance: pip install 'llguidance>=1.9,<2'") from error
    return llguidance


def _as_dict(response_format):
    return response_format.model_dump() if hasattr(response_format, "model_dump") else response_format


def _schema_of(response_format) -> tuple[dict | None, bool]:
    """(JSON schema, strict) for a valid response_format; (None, False) for plain text. Raises
    ResponseFormatError with the user-facing sentence otherwise."""
    response_format = _as_dict(response_format)
    if response_format is None:
        return None, False
    if not isinstance(response_format, dict):
        raise ResponseFormatError('response_format must be an object such as {"type": "json_object"}.')
    kind = response_format.get("type")
    if kind == "text":
        return None, False
    if kind == "json_object":
        return ANY_OBJECT, False
    if kind != "json_schema":
        raise ResponseFormatError(f"response_format.type {kind!r} is not supported: use 'text', 'json_object' "
                                  "or 'json_schema'.")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ResponseFormatError('response_format.json_schema is required with type "json_schema": '
                                  '{"name": ..., "schema": {...}, "strict": true}.')
    if unknown := sorted(set(spec) - SCHEMA_KEYS):
        raise ResponseFormatError(f"response_format.json_schema has unknown field(s) {', '.join(unknown)}: "
                                  f"use {', '.join(sorted(SCHEMA_KEYS))}.")
    name = spec.get("name")
    if not (isinstance(name, str) and 0 < len(name) <= 64
            and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)):
        raise ResponseFormatError("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'.")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise ResponseFormatError("response_format.json_schema.strict must be true or false.")
    if not isinstance(spec.get("schema"), dict):
        raise ResponseFormatError("response_format.json_schema.schema must be a JSON Schema object, "
                                  'e.g. {"type": "object", "properties": {...}}.')
    return spec["schema"], bool(spec.get("strict"))


def _grammar(schema_json: str, strict: bool, field: str = "response_format.json_schema.schema") -> str:
    """llguidance's grammar for a canonical schema text, checked (kept in TEXTS); errors name `field`. strict
    rejects keywords llguidance cannot enforce (uniqueItems, not, if/then, ...); non-strict, as OpenAI's
    strict=false, enforces the rest."""
    key = ("json", schema_json, strict)
    if (grammar := TEXTS.get(key)) is None:
        with compiling():
            if (grammar := TEXTS.get(key)) is None:  # or compiled meanwhile by the thread this one waited for
                grammar = _compile_schema(schema_json, strict, field)
                TEXTS.put(key, grammar, len(grammar) + len(schema_json))
    return grammar


def _compile_schema(schema_json: str, strict: bool, field: str) -> str:
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.loads(schema_json),
                                                         defaults={**JSON_OPTIONS, "lenient": not strict})
    except ValueError as error:
        raise ResponseFormatError(f"{field} is not a valid JSON Schema: {error}.") from None
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        hint = (" Remove them, or set response_format.json_schema.strict to false to enforce the rest."
                if strict and "Unimplemented keys" in messages[0] and field.startswith("response_format") else "")
        raise ResponseFormatError(f"{field} cannot be enforced: {messages[0].strip()}.{hint}")
    return grammar


def _grammar_for(response_format) -> str | None:
    if isinstance(response_format, Grammar):
        return response_format.text
    schema, strict = _schema_of(response_format)
    if schema is None:
        return None
    # Not sort_keys: properties are generated in the order the schema declares them (as OpenAI does).
    return _grammar(json.dumps(schema, separators=(",", ":")), strict)


def response_format_error(response_format) -> str | None:
    """The sentence for a 400 on `response_format` when it is invalid or cannot be enforced; None when fine."""
    try:
        _grammar_for(response_format)
    except ResponseFormatError as error:
        return str(error)
    return None


class _Compiled:
    """One tokenizer's llguidance tokenizer, and the grammars compiled for it (template matchers, never
    advanced: each row deep-copies one), kept in grammar_cache.TEMPLATES."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        llg = _llguidance()
        # llguidance refuses a width below the tokenizer's; a narrower lm_head is cut in allowed() instead.
        self.tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=max(vocab_size, len(tokenizer)),
                                               eos_token=list(eos_token_ids))

    def template(self, grammar: str):
        """The compiled matcher of `grammar`: kept, or compiled now (one compile at a time)."""
        if (template := TEMPLATES.get((self, grammar))) is None:
            with compiling():
                if (template := TEMPLATES.get((self, grammar))) is None:
                    template = _llguidance().LLMatcher(self.tokenizer, grammar, log_level=0)  # errors: .error
                    _check_start(template)
                    TEMPLATES.put((self, grammar), template, template_bytes(grammar))
        return template

    def forget(self, grammar: str) -> None:
        """Drop a compiled grammar whose copy met a limit: its copies share the lexer whose budget ran out."""
        TEMPLATES.forget((self, grammar))


def _first_line(error: str) -> str:
    return (error.strip().splitlines() or ["unknown error"])[0]


def _check_start(template) -> None:
    """ResponseFormatError unless a compiled grammar can give its first mask: the tokenizer-free check passed,
    so what fails here is a limit hit or a grammar with no first character (a `$ref` to itself)."""
    probe = template if template.is_error() else template.deep_copy()
    if not probe.is_error():
        probe.compute_bitmask()
    if probe.is_error():
        raise ResponseFormatError(f"response_format cannot be enforced: {_first_line(probe.get_error())}")


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(vocab, eos): _Compiled}
_COMPILED_LOCK = threading.Lock()


def _compiled(tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> _Compiled:
    with _COMPILED_LOCK:
        per_tokenizer = _COMPILED.setdefault(tokenizer, {})
        key = (vocab_size, eos_token_ids)
        if key not in per_tokenizer:
            per_tokenizer[key] = _Compiled(tokenizer, vocab_size, eos_token_ids)
        return per_tokenizer[key]


@dataclass(frozen=True)
class _Ready:
    """A grammar compiled for one tokenizer, vocabulary and EOS set: what each row's Constraint copies."""

    compiled: _Compiled
    grammar: str
    template: object  # the compiled matcher, never advanced
    vocab_size: int
    tokenizer_size: int  # the ids past it (lm_head padding) are never allowed
    eos_token_ids: tuple[int, ...]


def _ready(tokenizer, response_format, vocab_size: int, eos_token_ids: tuple[int, ...]) -> _Ready | None:
    grammar = _grammar_for(response_format)
    if grammar is None:
        return None
    compiled = _compiled(tokenizer, vocab_size, eos_token_ids)
    return _Ready(compiled, grammar, compiled.template(grammar), vocab_size, min(len(tokenizer), vocab_size),
                  eos_token_ids)


class Constraint:
    """One row's constraint: which tokens may come next under `response_format`. Raises ResponseFormatError
    for a format it cannot enforce. `eos_token_ids` (default: the tokenizer's EOS) end the row once the JSON is
    complete."""

    def __init__(self, tokenizer, response_format, vocab_size: int, *, eos_token_ids=None):
        eos = tuple(eos_token_ids or [tokenizer.eos_token_id])
        self._start(vocab_size, eos, _ready(tokenizer, response_format, vocab_size, eos))

    @classmethod
    def of(cls, ready: _Ready) -> Constraint:
        """A new row's constraint from a grammar compiled already: a copy of it, nothing compiled."""
        constraint = cls.__new__(cls)
        constraint._start(ready.vocab_size, ready.eos_token_ids, ready)
        return constraint

    def _start(self, vocab_size: int, eos_token_ids: tuple[int, ...], ready: _Ready | None) -> None:
        import torch

        self.vocab_size, self.eos_token_ids, self._ready = vocab_size, eos_token_ids, ready
        self._matcher, self._ended = None, False
        if ready is None:
            return
        self._matcher = ready.template.deep_copy()
        self._tokenizer_size = ready.tokenizer_size
        self._words = torch.zeros((ready.compiled.tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
        self._eos_only = torch.zeros(vocab_size, dtype=torch.bool)
        self._eos_only[[i for i in eos_token_ids if i < vocab_size]] = True

    def allowed(self, row=None):
        """bool [vocab_size], True where the next token may go; None when unconstrained or after EOS."""
        import numpy as np
        import torch

        if self._matcher is None or self._ended:
            return None
        if not self._matcher.is_error() and self._matcher.is_stopped():  # complete, nothing may extend it
            return self._eos_only.clone()
        if not self._matcher.is_error():
            self._matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        if self._matcher.is_error():  # a limit met: this step's mask, or consuming the last token
            self._ready.compiled.forget(self._ready.grammar)  # the next request compiles afresh
            raise ConstraintFailed(f"the grammar cannot go on: {_first_line(self._matcher.get_error())}")
        # Bit i of word w is token 32*w + i: the words' little-endian bytes unpack in token order ([W] -> [32W]).
        words = self._words.numpy().astype("<i4", copy=False)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:self.vocab_size]
        bits[self._tokenizer_size:] = 0  # llguidance never allows them; made certain for lm_head padding
        return torch.from_numpy(bits).view(torch.bool)

    def advance(self, token: int) -> bool:
        """Move past the sampled token; False when the grammar did not allow it."""
        if self._matcher is None or self._ended:
            return True
        token = int(token)
        accepted = self._matcher.consume_token(token)
        self._ended = accepted and token in self.eos_token_ids
        return accepted

    def is_done(self) -> bool:
        """True once the JSON is complete and only EOS may follow (or was taken), or the grammar was broken."""
        return self._matcher is not None and (self._ended or self._matcher.is_stopped() or self._matcher.is_error())

    @property
    def error(self) -> str | None:
        """Why the constraint failed (a token outside the grammar), or None."""
        return self._matcher.get_error() if self._matcher is not None and self._matcher.is_error() else None


def token_mask(tokenizer, response_format, vocab_size: int, *, eos_token_ids=None):
    """`SamplingParams.token_mask` for a request: a factory of fresh Constraints, one per row, or None for plain
    text. The grammar compiles here (or comes from the cache), so an unenforceable format fails before the
    request is queued; the factory holds it, so a row never compiles on the engine's thread."""
    ready = _ready(tokenizer, response_format, vocab_size, tuple(eos_token_ids or [tokenizer.eos_token_id]))
    return None if ready is None else functools.partial(Constraint.of, ready)


def parameters_schema(parameters: dict | None) -> dict:
    """The JSON schema a function's arguments must match: its `parameters` (an object schema), or no arguments
    at all when it has none (OpenAI: "omitting parameters defines a function with an empty parameter list")."""
    if not parameters:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return {"type": "object", **parameters}


def schema_error(schema: dict, field: str, *, strict: bool = False) -> str | None:
    """The sentence for a 400 on `field` when llguidance cannot read or enforce the JSON schema; None when fine."""
    try:
        _grammar(json.dumps(schema, separators=(",", ":")), strict, field)
    except ResponseFormatError as error:
        return str(error)
    return None


def tool_call_grammar(functions: list[dict], style: str, *, parallel: bool = False) -> Grammar:
    """A grammar whose every sentence is a call of one of `functions` ({"name", "parameters"}), written as `style`
    (data/tools.py) prints calls, so `parse_reply` reads it and the arguments validate:
    - "hermes": `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`; with `parallel`, one or more
      such calls separated by a newline (as Qwen2.5's template joins them);
    - "json": the whole reply one object `{"name": ..., "parameters": {...}}` (Llama 3.1), one call only.
    The call object is an inline `%json` schema: anyOf one branch per function, its name a const."""
    key = "parameters" if style == "json" else "arguments"
    branches = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                   key: parameters_schema(f.get("parameters"))},
                 "required": ["name", key], "additionalProperties": False} for f in functions]
    # The call is held to the exact spacing calls are trained on (data/tools.format_call and templates' tojson
    # write json.dumps' ", " and ": "): with response_format's flexible whitespace 8 of the embedded model's
    # 100 forced calls ran past 256 tokens (99 tokens a call on average), with this spacing 4 (74 a call;
    # docs/benchmarks.md#tool-calling). Lenient: keywords llguidance cannot enforce are skipped, as OpenAI's
    # strict=false (the tools passed schema_error already).
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
    call = json.dumps({"x-guidance": options, "anyOf": branches}, ensure_ascii=False)
    if style == "json":
        lark = f"start: %json {call}\n"
    else:  # json.dumps writes each literal as a Lark string: quoted, the newline escaped
        opening, closing = json.dumps(CALL_OPEN + "\n"), json.dumps("\n" + CALL_CLOSE)
        more = ' ("\\n" call)*' if parallel else ""
        lark = f"start: call{more}\ncall: {opening} %json {call} {closing}\n"
    return Grammar(_lark(lark))


def _lark(lark: str) -> str:
    """llguidance's grammar for a Lark text, checked (kept in TEXTS: the same tools come with every request of an
    agent)."""
    if (grammar := TEXTS.get(("lark", lark))) is None:
        with compiling():
            llg = _llguidance()
            grammar = llg.LLMatcher.grammar_from_lark(lark)
            failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
            if failed:  # each function's parameters passed schema_error: a failure here is a bug, not the client's
                raise ResponseFormatError(f"the tool call grammar cannot be enforced: {messages[0].strip()}")
            TEXTS.put(("lark", lark), grammar, len(grammar) + len(lark))
    return grammar

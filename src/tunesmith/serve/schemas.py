"""Request bodies of the OpenAI-compatible API, with OpenAI's field names, types and ranges, and `parse`, which
turns raw body bytes into one of them.

Types are strict, as OpenAI's are: `"max_tokens": "10"` and `"temperature": true` are rejected (an integer is
still a valid float). Fields OpenAI's clients send that do not change the reply (`user`, `metadata`, `store`,
...) are accepted and ignored; settings that would change the reply and that this server cannot honour (audio,
best_of) are rejected by `unsupported()` with the parameter's name. Any other unknown field is rejected (400),
never silently ignored. Tools (`tools`, `tool_choice`, `parallel_tool_calls`, the older `functions` and
`function_call`, assistant `tool_calls` and `tool` messages) are checked here: every function's parameters must
be a JSON schema of an object that llguidance can enforce, since `required` forces calls that validate. For
thinking models, `reasoning_effort` and vLLM's `chat_template_kwargs` set the chat template's variables
(serve/reasoning.py), and an assistant message may carry back its `reasoning_content`."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..data.reasoning import EFFORTS
from ..data.templates import TemplateKwargs
from ..data.tools import arguments_object
from ..data.toolcheck import parameters_problems
from ..generation.grammar import parameters_schema, response_format_error, schema_error
from ..generation.params import LIMITS

ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # function: the older tool role
NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
MAX_DEPTH = 64  # OpenAI's bodies nest a handful of levels; far deeper is an attack on recursive parsers


class BodyError(ValueError):
    """A body that is not a valid request: the message says what is wrong, `param` names the field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against length side channels; nothing to hide here


class _Sampling(_Strict):
    model: str
    # The sampling ranges are generation's LIMITS, the same for Python and the CLI; the caps on n and the
    # int64 seed are the wire format's.
    temperature: Annotated[float, LIMITS["temperature"]] = 1.0
    top_p: Annotated[float, LIMITS["top_p"]] = 1.0
    n: Annotated[int, LIMITS["n"], Field(le=16)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-2**63, le=2**63 - 1)] | None = None  # OpenAI's seed is an int64
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, LIMITS["presence_penalty"]] = 0.0
    frequency_penalty: Annotated[float, LIMITS["frequency_penalty"]] = 0.0
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's chat: at least one token; see completions'
    logit_bias: dict[str, Annotated[float, LIMITS["logit_bias"]]] | None = None  # keys: token ids
    # Accepted and ignored: bookkeeping on OpenAI's side that does not change the reply.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, value, info):  # as OpenAI: a 400, not silently ignored
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first setting that would change the reply and that we cannot honour."""
        return None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    # A string, a list of strings, a list of token ids, or a list of token-id lists, as OpenAI's API takes
    # (lm-evaluation-harness sends token ids by default).
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, LIMITS["max_new_tokens"]] | None = None  # 0: only the prompt (echo + logprobs: scoring)
    logprobs: Annotated[int, LIMITS["logprobs"], Field(le=5)] | None = None
    echo: bool = False
    best_of: Annotated[int, LIMITS["n"], Field(le=16)] | None = None
    suffix: str | None = None

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of not in (None, self.n):  # best_of == n returns all n samples: the plain n choices
            return "best_of", "best_of other than n is not supported by this server; leave it out."
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server; leave it out."
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str
    arguments: str  # a JSON object, as a string

    @field_validator("arguments")
    @classmethod
    def _an_object(cls, arguments: str) -> str:
        try:
            arguments_object(arguments)
        except ValueError as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"arguments must be a JSON object as a string ({err})") from None
        return arguments


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None  # on assistant messages an SDK sends back as history
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this result answers
    function_call: CalledFunction | None = None  # assistant, the older API: its one call
    reasoning_content: str | None = None  # assistant: a thinking model's reasoning, as this server returns it

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        return role

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDef(_Strict):
    name: Annotated[str, Field(pattern=NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: no arguments
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedTool(_Strict):  # tool_choice {"type": "function", "function": {"name": ...}}
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class Prediction(_Strict):  # predicted output: a latency hint, the reply is the same without it
    type: Literal["content"]
    content: str | list[TextPart]


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, LIMITS["logprobs"], Field(le=20)] | None = None
    conversation: str | None = None  # tunesmith extension: the server supplies and extends the history
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None  # the older spelling of tools, answered in its own shape
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: Prediction | None = None
    # OpenAI's reasoning effort: for a template that switches thinking (Qwen3, SmolLM3) "none" and "minimal" turn it
    # off, the others on; a template that reads reasoning_effort gets it as it is (data/reasoning.effort_kwargs)
    reasoning_effort: Literal[EFFORTS] | None = None
    # vLLM's extension: variables for the chat template (enable_thinking), merged over the run's recorded ones
    chat_template_kwargs: TemplateKwargs | None = None

    @property
    def functions_of_tools(self) -> list[FunctionDef]:
        """The functions the model may call, from `tools` or the older `functions`."""
        return [t.function for t in self.tools or []] or list(self.functions or [])

    @property
    def legacy(self) -> bool:
        """Whether the request uses the older `functions` / `function_call` (answered with `function_call`)."""
        return bool(self.functions) or (self.function_call is not None and self.tool_choice is None)

    @property
    def choice(self) -> str:
        """How tools are used: "none", "auto", "required" or the name of the one function to call."""
        choice = self.function_call if self.legacy else self.tool_choice
        if isinstance(choice, (NamedTool, NamedFunction)):
            return choice.function.name if isinstance(choice, NamedTool) else choice.name
        if choice in (None, "auto") and not self.functions_of_tools:
            return "none"  # OpenAI: "none is the default when no tools are present"
        return choice or "auto"

    def prompt_messages(self) -> list[dict]:
        """The messages as tunesmith's chat record (data/tools.py): "developer" is the system role (chat templates
        know only "system"); the older assistant `function_call` and `function` messages become a call with an
        id and a `tool` message answering it."""
        out, legacy = [], None
        for i, m in enumerate(self.messages):
            if m.role == "function":
                out.append({"role": "tool", "tool_call_id": legacy or f"call_{i}", "content": m.text()})
                continue
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            calls = [c.model_dump() for c in m.tool_calls or []]
            if m.function_call is not None:
                legacy = f"call_{i}"
                calls.append({"id": legacy, "type": "function", "function": m.function_call.model_dump()})
            if calls:
                message.update(content=m.text() or None, tool_calls=calls)
            if m.role == "tool":
                message["tool_call_id"] = m.tool_call_id
            if m.reasoning_content is not None and m.role == "assistant":  # the template decides if it shows
                message["reasoning_content"] = m.reasoning_content
            out.append(message)
        return out

    def _tools_problem(self) -> tuple[str, str] | None:
        if self.tools and self.functions:
            return "functions", "Send tools or the older functions, not both."
        field = "tools" if self.tools else "functions"
        names = [f.name for f in self.functions_of_tools]
        for i, f in enumerate(self.functions_of_tools):
            where = f"{field}.{i}.function" if self.tools else f"functions.{i}"
            if names.index(f.name) != i:
                return f"{where}.name", f"{where}.name: the function {f.name!r} is defined twice."
            # the data readers' check of a definition (jsonschema's meta-schema), then whether llguidance can
            # enforce it (tool_choice required or a named function constrain the call by it)
            for field_name, why in parameters_problems(f.parameters, f"{where}.parameters")[:1] \
                    if f.parameters is not None else ():
                return f"{where}.parameters", f"{field_name}: {why}."
        param = "function_call" if self.legacy else "tool_choice"
        if self.choice == "required" and not names:
            return param, f"{param} 'required' needs tools to call; send tools or leave {param} out."
        if self.choice not in ("none", "auto", "required") and self.choice not in names:
            return param, f"{param} names the function {self.choice!r}, which is not among the tools."
        return self._tool_messages_problem()

    def _tool_messages_problem(self) -> tuple[str, str] | None:
        """A tool result must answer a call: its id one of the calls of the last assistant message before it (in
        a server-side conversation that message may be stored, so only the id's presence is checked)."""
        calls: set[str] = set()
        for i, m in enumerate(self.messages):
            if m.role == "assistant":
                calls = {c.id for c in m.tool_calls or []}
            elif m.role == "tool":
                if not m.tool_call_id:
                    return f"messages.{i}.tool_call_id", f"messages.{i}.tool_call_id is required on a tool message."
                if self.conversation is None and m.tool_call_id not in calls:
                    return f"messages.{i}.tool_call_id", (
                        f"messages.{i}.tool_call_id {m.tool_call_id!r} answers no call of the assistant message "
                        "before it; a tool message must follow the assistant message with that call in tool_calls.")
            elif m.role == "function" and not m.name:
                return f"messages.{i}.name", f"messages.{i}.name is required on a function message."
        return None

    def grammar_problem(self) -> tuple[str, str] | None:
        """(param, message) for the first JSON schema llguidance cannot read or enforce: each function's
        parameters (tool_choice "required" or a named function constrains a call by them), then the
        response_format. Compiles them (cached): the server calls it on its grammar threads (jobs.grammar_work)."""
        field = "tools" if self.tools else "functions"
        for i, f in enumerate(self.functions_of_tools):
            where = f"{field}.{i}.function" if self.tools else f"functions.{i}"
            if problem := schema_error(parameters_schema(f.parameters), f"{where}.parameters",
                                       strict=bool(f.strict)):
                return f"{where}.parameters", problem
        if self.response_format is not None and (problem := response_format_error(self.response_format)):
            return "response_format", problem
        return None

    def unsupported(self) -> tuple[str, str] | None:
        if problem := self._tools_problem():
            return problem
        if "audio" in (self.modalities or []):
            return "modalities", "modalities: audio output is not supported by this server; use [\"text\"]."
        if self.audio is not None:
            return "audio", "audio output is not supported by this server; leave the audio parameter out."
        return super().unsupported()


class ConversationCreate(_Strict):
    model: str | None = None
    system: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def error_param(loc) -> str | None:
    """`messages.0.role` from a pydantic error location, without the union branch tags (`str`, `list[str]`)."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    return ".".join(parts) or None


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_tree(data) -> None:
    """Reject what parses but breaks later: nesting deeper than MAX_DEPTH, and lone UTF-16 surrogates
    (`"\\ud800"` is valid JSON but not Unicode: it cannot be tokenized, stored or sent back as UTF-8)."""
    stack = [(data, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BodyError(f"The request body is nested more than {MAX_DEPTH} levels deep.", code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)  # the error names the object: a bad key cannot be sent back as text
                stack.append((item, path + (key,), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, path + (i,), depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        param = ".".join(str(p) for p in path) or None
        where = f"{param} contains" if param else "The request body contains"
        raise BodyError(f"{where} a lone surrogate ({text[err.start]!r}), which is not valid Unicode; encode "
                        "the text as UTF-8 or pair each surrogate.", param=param, code="invalid_unicode") from None


_JSON_TAG = {str: "str", bool: "bool", int: "int", float: "float", list: "list", dict: "dict", type(None): "none"}


def _value_at(data, loc):
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _closest(branches: dict[str, list[dict]], at: int) -> list[dict]:
    """The errors of the union branch closest to what was sent: the fewest wrong types ("Input should be a valid
    string" for each of [1, -1, 2]), then the fewest errors, then the one that got furthest into the value
    ([1, "a"] is a list of token ids wrong at its item 1 rather than a list of strings wrong at its item 0)."""
    def progress(errors: list[dict]) -> tuple:
        return tuple(p if isinstance(p, int) else 0 for p in errors[0]["loc"][at + 1:])

    def wrong_types(errors: list[dict]) -> int:
        return sum(e["type"].endswith("_type") for e in errors)

    fewest = min((wrong_types(b), len(b)) for b in branches.values())
    return max((b for b in branches.values() if (wrong_types(b), len(b)) == fewest), key=progress)


def _explain(errors: list[dict], data: dict) -> list[tuple[str | None, str]]:
    """(param, message) per problem, in order. For a field whose type is a union (`stop`: a string or a list
    of up to 4; `prompt`: a string, strings, token ids or lists of them), pydantic reports every branch's
    errors; only the branch matching the JSON type the client sent, and of those the closest (`_closest`),
    says what is wrong ("List should have at most 4 items", not "Input should be a valid string")."""
    groups: dict[tuple, list[dict]] = {}
    for e in errors:
        loc = e["loc"]
        tag_at = next((i for i, p in enumerate(loc) if isinstance(p, str) and p.split("[")[0] in _TYPE_TAGS),
                      len(loc))
        groups.setdefault(tuple(loc[:tag_at]), []).append(e)
    out = []
    for head, group in groups.items():
        if len(group) > 1 and any(len(e["loc"]) > len(head) for e in group):
            sent = _JSON_TAG.get(type(_value_at(data, head)))
            branches: dict[str, list[dict]] = {}
            for e in group:
                if len(e["loc"]) > len(head) and str(e["loc"][len(head)]).split("[")[0] == sent:
                    branches.setdefault(str(e["loc"][len(head)]), []).append(e)
            group = _closest(branches, len(head)) if branches else group[:1]
        out += [(error_param(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in group]
    return out


def parse(raw: bytes, schema: type[BaseModel]):
    """(validated body, the JSON object it came from) from the raw bytes of a request; BodyError if invalid.
    CPU work proportional to the body: the server runs it off the event loop."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)  # NaN and Infinity are not JSON
    except (ValueError, RecursionError):  # RecursionError: brackets nested ~1000 deep
        raise BodyError("We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BodyError("The request body must be a JSON object.", code="invalid_json")
    _check_tree(data)
    try:
        body = schema.model_validate(data)
    except ValidationError as err:
        problems = _explain(err.errors(), data)
        param = problems[0][0]
        raise BodyError("; ".join(f"{p}: {m}" if p else m for p, m in problems), param=param) from None
    problem = getattr(body, "unsupported", lambda: None)()
    if problem is not None:
        raise BodyError(problem[1], param=problem[0], code="unsupported_parameter")
    return body, data

"""Text generation from Python: `generate` (one reply), `stream` (its pieces as they come) and `generate_batch`
(many prompts, as evaluation uses it). Each is a thin caller of the one engine (`generation.engine`) that
the terminal chat and the server use too, run in the caller's thread over the model as the caller left it.

With `tools=` (OpenAI's tool definitions) a chat prompt carries them as training rendered them (data/tools.py),
and the calls a reply makes are read back into `Generation.tool_calls`; `Generation.message` is the assistant
message to append to the conversation before the `tool` results. `chat_template_kwargs` are the template's
variables (Qwen3's `enable_thinking`); with a template that thinks in <think> tags a chat reply's reasoning is
split off into `Generation.reasoning_content` (data/reasoning.py), and the content is the answer alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..data.reasoning import opens_thinking, split_reasoning, thinks
from ..data.templates import chat_template_for
from ..data.tokenize import encode_chat_prompt
from ..data.tools import call_style, parse_reply, with_ids
from ..errors import TunesmithError, UsageError
from .engine import Engine, Event, Request
from .params import SamplingParams

__all__ = ["Generation", "GenerationError", "SamplingParams", "generate", "generate_batch", "prompt_ids", "stream"]


@dataclass
class Generation:
    text: str  # the reply as generated, a call's markup and a think block included
    finish_reason: str  # "stop" (a stop token or string), "length", or "grammar_error" (the token mask gave up)
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[dict] | None = None  # with tools=: the calls made (OpenAI's, with ids); None when none parse
    content: str | None = None  # the answer besides the calls (None: nothing but calls); `answer` when no call
    reasoning_content: str | None = None  # a thinking template's reply: what it wrote in <think> tags; None: none
    answer: str | None = None  # the text after its reasoning, calls' markup included (the text when nothing split)

    def __post_init__(self):
        if self.answer is None:
            self.answer = self.text
        if self.tool_calls is None and self.content is None:
            self.content = self.answer

    @property
    def message(self) -> dict:
        """The reply as the assistant message of an OpenAI conversation (with its reasoning, when it has some:
        the template decides whether a later prompt shows it)."""
        calls = {"tool_calls": self.tool_calls} if self.tool_calls else {}
        reasoning = {"reasoning_content": self.reasoning_content} if self.reasoning_content is not None else {}
        return {"role": "assistant", "content": self.content, **reasoning, **calls}


def prompt_ids(tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
               chat_template: str | None = None, tools: list[dict] | None = None,
               chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids for a completion prompt or a chat conversation (with the generation prompt appended; `tools`
    rendered as data/tools.py says for the template, `chat_template_kwargs` its variables)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (completion) or messages (chat)")
    if messages is not None:
        return encode_chat_prompt(tokenizer, messages, chat_template=chat_template, tools=tools,
                                  chat_template_kwargs=chat_template_kwargs)
    if tools:
        raise UsageError("tools need a chat conversation (messages), not a completion prompt")
    return tokenizer(prompt, add_special_tokens=True, split_special_tokens=True)["input_ids"]


def _reader(tokenizer, chat_template: str | None, tools: list[dict] | None, ids: list[int]):
    """What turns a finished chat reply's text into (reasoning, answer, content, calls with ids): the reasoning
    split off where the template thinks in <think> tags (data/reasoning.py), then calls read from the answer,
    given tools. None when there is nothing to read (the content is then the text)."""
    template = chat_template_for(tokenizer, chat_template)
    thinking = thinks(template)
    if not tools and not thinking:
        return None
    opened = thinking and opens_thinking(tokenizer, ids)
    style = call_style(template)

    def read(text: str) -> tuple[str | None, str, str | None, list[dict] | None]:
        reasoning, answer = split_reasoning(text, opened) if thinking else (None, text)
        content, calls = parse_reply(answer, style) if tools else (answer, None)
        return reasoning, answer, content, with_ids(calls)
    return read


class GenerationError(TunesmithError, RuntimeError):
    """A reply that could not be generated (its settings or the model failed); the message says why."""


class _Collect:
    """The events of one request, gathered into its text, the pieces not yet streamed, and its Generation."""

    def __init__(self, n_prompt: int, on_done: Callable[[], None] | None = None, read=None):
        self.pieces: list[str] = []
        self.fresh: list[str] = []  # pieces not yet handed to a stream's caller
        self.result: Generation | None = None
        self.error: str | None = None
        self.n_prompt, self.on_done, self.read = n_prompt, on_done, read

    def check(self) -> None:
        if self.error:
            raise GenerationError(f"generation failed: {self.error}")

    def __call__(self, event: Event) -> None:
        self.error = event.error
        if event.text:
            self.pieces.append(event.text)
            self.fresh.append(event.text)
        if event.finish_reason:
            text = "".join(self.pieces)
            reasoning, answer, content, calls = self.read(text) if self.read else (None, None, None, None)
            self.result = Generation(text, event.finish_reason, self.n_prompt, event.completion_tokens, calls, content,
                                     reasoning, answer)
            if self.on_done:
                self.on_done()


def stream(model, tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
           params: SamplingParams | None = None, chat_template: str | None = None, tools: list[dict] | None = None,
           chat_template_kwargs: dict | None = None, result: list | None = None) -> Iterator[str]:
    """Yield the reply as it is generated (a call's markup and a think block too). If `result` is a list, the
    final `Generation` is appended to it."""
    params = params or SamplingParams()
    if params.n != 1:
        raise UsageError(f"stream and generate give one reply; use generate_batch for n={params.n} choices")
    ids = prompt_ids(tokenizer, prompt=prompt, messages=messages, chat_template=chat_template, tools=tools,
                     chat_template_kwargs=chat_template_kwargs)
    engine = Engine.for_model(model, tokenizer)
    read = _reader(tokenizer, chat_template, tools, ids) if messages is not None else None
    collect = _Collect(len(ids), read=read)
    engine.submit([Request("model", ids, params, collect)])
    while engine.busy:
        engine.step()
        collect.check()
        while collect.fresh:
            yield collect.fresh.pop(0)
    if result is not None:
        result.append(collect.result)


def generate(model, tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
             params: SamplingParams | None = None, chat_template: str | None = None, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
    """Generate one reply; `on_text` receives each streamed piece as it arrives."""
    result: list[Generation] = []
    for piece in stream(model, tokenizer, prompt=prompt, messages=messages, params=params,
                        chat_template=chat_template, tools=tools, chat_template_kwargs=chat_template_kwargs,
                        result=result):
        if on_text:
            on_text(piece)
    return result[0]


def generate_batch(model, tokenizer, requests: list[dict], *, params: SamplingParams | None = None,
                   chat_template: str | None = None, tools: list[dict] | None = None,
                   chat_template_kwargs: dict | None = None, batch_size: int = 16, progress=None) -> list[Generation]:
    """Generate for many requests ({"prompt": ...} or {"messages": [...]}, with their own "tools" or `tools`),
    `batch_size` rows at a time with continuous batching (a finished row's place goes to the next prompt at once).

    Each reply is what `generate` gives for that request alone. With `params.n` > 1 each request has n
    replies, one after the other (choice j seeded with seed + j). Used by evaluation; `progress` (a
    progress.Progress) advances as each request's replies are done."""
    params = params or SamplingParams()
    tools_of = [r.get("tools", tools) for r in requests]
    encoded = [prompt_ids(tokenizer, prompt=r.get("prompt"), messages=r.get("messages"), chat_template=chat_template,
                          tools=t, chat_template_kwargs=chat_template_kwargs) for r, t in zip(requests, tools_of)]
    engine = Engine.for_model(model, tokenizer, max_batch=batch_size)
    left = [params.n] * len(encoded)  # replies still running, per request

    def done(i: int) -> None:
        left[i] -= 1
        if not left[i] and progress is not None:
            progress.update(1)

    readers = [_reader(tokenizer, chat_template, t, ids) if "messages" in r else None
               for r, t, ids in zip(requests, tools_of, encoded)]
    collected = [_Collect(len(ids), lambda i=i: done(i), readers[i])
                 for i, ids in enumerate(encoded) for _ in range(params.n)]
    engine.submit([Request("model", ids, choice, collected[i * params.n + j], index=i * params.n + j)
                   for i, ids in enumerate(encoded) for j, choice in enumerate(params.choices())])
    while engine.busy:
        engine.step()
        for c in collected:
            c.check()
    return [c.result for c in collected]

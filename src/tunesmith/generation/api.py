"""Text generation from Python: `generate` (one reply), `stream` (its pieces as they come) and `generate_batch`
(many prompts, as evaluation uses it). Each is a thin caller of the one engine (`generation.engine`) that
the terminal chat and the server use too, run in the caller's thread over the model as the caller left it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..data.tokenize import encode_chat_prompt
from ..errors import TunesmithError, UsageError
from .engine import Engine, Event, Request
from .params import SamplingParams

__all__ = ["Generation", "GenerationError", "SamplingParams", "generate", "generate_batch", "prompt_ids", "stream"]


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length"
    prompt_tokens: int
    completion_tokens: int


def prompt_ids(tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
               chat_template: str | None = None) -> list[int]:
    """Token ids for a completion prompt or a chat conversation (with the generation prompt appended)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (completion) or messages (chat)")
    if messages is not None:
        return encode_chat_prompt(tokenizer, messages, chat_template=chat_template)
    return tokenizer(prompt, add_special_tokens=True, split_special_tokens=True)["input_ids"]


class GenerationError(TunesmithError, RuntimeError):
    """A reply that could not be generated (its settings or the model failed); the message says why."""


class _Collect:
    """The events of one request, gathered into its text, the pieces not yet streamed, and its Generation."""

    def __init__(self, n_prompt: int, on_done: Callable[[], None] | None = None):
        self.pieces: list[str] = []
        self.fresh: list[str] = []  # pieces not yet handed to a stream's caller
        self.result: Generation | None = None
        self.error: str | None = None
        self.n_prompt, self.on_done = n_prompt, on_done

    def check(self) -> None:
        if self.error:
            raise GenerationError(f"generation failed: {self.error}")

    def __call__(self, event: Event) -> None:
        self.error = event.error
        if event.text:
            self.pieces.append(event.text)
            self.fresh.append(event.text)
        if event.finish_reason:
            self.result = Generation("".join(self.pieces), event.finish_reason, self.n_prompt, event.completion_tokens)
            if self.on_done:
                self.on_done()


def stream(model, tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
           params: SamplingParams | None = None, chat_template: str | None = None,
           result: list | None = None) -> Iterator[str]:
    """Yield the reply as it is generated. If `result` is a list, the final `Generation` is appended to it."""
    params = params or SamplingParams()
    if params.n != 1:
        raise UsageError(f"stream and generate give one reply; use generate_batch for n={params.n} choices")
    ids = prompt_ids(tokenizer, prompt=prompt, messages=messages, chat_template=chat_template)
    engine = Engine.for_model(model, tokenizer)
    collect = _Collect(len(ids))
    engine.submit([Request("model", ids, params, collect)])
    while engine.busy:
        engine.step()
        collect.check()
        while collect.fresh:
            yield collect.fresh.pop(0)
    if result is not None:
        result.append(collect.result)


def generate(model, tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
             params: SamplingParams | None = None, chat_template: str | None = None,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Generate one reply; `on_text` receives each streamed piece as it arrives."""
    result: list[Generation] = []
    for piece in stream(model, tokenizer, prompt=prompt, messages=messages, params=params,
                        chat_template=chat_template, result=result):
        if on_text:
            on_text(piece)
    return result[0]


def generate_batch(model, tokenizer, requests: list[dict], *, params: SamplingParams | None = None,
                   chat_template: str | None = None, batch_size: int = 16, progress=None) -> list[Generation]:
    """Generate for many requests ({"prompt": ...} or {"messages": [...]}), `batch_size` rows at a time with
    continuous batching (a finished row's place goes to the next prompt at once).

    Each reply is what `generate` gives for that request alone. With `params.n` > 1 each request has n
    replies, one after the other (choice j seeded with seed + j). Used by evaluation; `progress` (a
    progress.Progress) advances as each request's replies are done."""
    params = params or SamplingParams()
    encoded = [prompt_ids(tokenizer, prompt=r.get("prompt"), messages=r.get("messages"),
                          chat_template=chat_template) for r in requests]
    engine = Engine.for_model(model, tokenizer, max_batch=batch_size)
    left = [params.n] * len(encoded)  # replies still running, per request

    def done(i: int) -> None:
        left[i] -= 1
        if not left[i] and progress is not None:
            progress.update(1)

    collected = [_Collect(len(ids), lambda i=i: done(i)) for i, ids in enumerate(encoded) for _ in range(params.n)]
    engine.submit([Request("model", ids, choice, collected[i * params.n + j], index=i * params.n + j)
                   for i, ids in enumerate(encoded) for j, choice in enumerate(params.choices())])
    while engine.busy:
        engine.step()
        for c in collected:
            c.check()
    return [c.result for c in collected]

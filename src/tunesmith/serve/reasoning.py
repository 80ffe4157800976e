"""The server's side of reasoning ("thinking") models: the chat template variables a request renders with, and its
replies split into reasoning and answer before tool calls are read from the answer, streamed or not.

Template variables merge as vLLM merges them: the served run's own (run.json's `chat_template_kwargs`, what it
trained with), then what `reasoning_effort` means for the template, then the request's `chat_template_kwargs`.

A model whose template thinks in `<think>` tags answers with the reasoning apart, in the field vLLM, llama.cpp
and DeepSeek use: `message.reasoning_content`, streamed as `delta.reasoning_content` chunks before the `content`
ones; the tags never reach `content`. The split works on the generated text (data/reasoning.py), so both
backends answer alike; a model whose template does not think is answered exactly as before."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..data.reasoning import ReasoningSplit, effort_kwargs, opens_thinking, split_reasoning, thinks
from ..data.templates import merge_kwargs
from ..runs import RunInfo
from .tools import Finished, ReplyStream, ToolPlan


def template_kwargs(body, template: str, run: RunInfo | None) -> dict | None:
    """The chat template variables of a ChatRequest to the model served with `template` (`run`: its run.json)."""
    return merge_kwargs(run.chat_template_kwargs if run else None, effort_kwargs(body.reasoning_effort, template),
                        body.chat_template_kwargs)


def with_reasoning(done: Finished, reasoning: str | None) -> Finished:
    """A finished reply with its reasoning beside its content (nothing added when it has none)."""
    if reasoning is None:
        return done
    return replace(done, record={**done.record, "reasoning_content": reasoning},
                   message={**done.message, "reasoning_content": reasoning})


@dataclass
class ReplyReader:
    """How one request's replies are read: the reasoning split off first where the template thinks, then the
    answer read for calls by the request's ToolPlan. `finish` and `stream` as ToolPlan's."""

    plan: ToolPlan
    thinks: bool = False  # the template writes reasoning in <think> tags
    opened: bool = False  # the prompt opened the think block: the reply begins as reasoning

    @classmethod
    def of(cls, plan: ToolPlan, template: str, tokenizer, prompt_ids: list[int]) -> ReplyReader:
        thinking = thinks(template)
        return cls(plan, thinking, thinking and opens_thinking(tokenizer, prompt_ids))

    def finish(self, text: str, finish: str) -> Finished:
        if not self.thinks:
            return self.plan.finish(text, finish)
        reasoning, content = split_reasoning(text, self.opened)
        return with_reasoning(self.plan.finish(content, finish), reasoning)

    def stream(self) -> ReplyStream | ReasonedStream:
        return ReasonedStream(self) if self.thinks else self.plan.stream()


class ReasonedStream:
    """One streamed choice of a thinking model: reasoning deltas as the reasoning is written, then the answer's
    deltas (content, calls) from the plan's ReplyStream. They add up to what `ReplyReader.finish` gives."""

    def __init__(self, reader: ReplyReader):
        self.split, self.reply, self.reasoning = ReasoningSplit(reader.opened), reader.plan.stream(), ""

    def feed(self, text: str) -> list[dict]:
        return self._deltas(*self.split.feed(text))

    def _deltas(self, reasoning: str, content: str) -> list[dict]:
        self.reasoning += reasoning
        return ([{"reasoning_content": reasoning}] if reasoning else []) + (self.reply.feed(content) if content else [])

    def end(self, finish: str) -> tuple[list[dict], Finished]:
        deltas = self._deltas(*self.split.end())
        closing, done = self.reply.end(finish)
        return deltas + closing, with_reasoning(done, self.reasoning or None)

"""Reasoning ("thinking") in conversations: what becomes of an assistant message's `reasoning_content` in
training (the data's policy), what a request's `reasoning_effort` means for a chat template, and how a generated
reply splits into its reasoning and its answer, streamed or whole. Training, evaluation, the Python API, `tunesmith
chat` and the server (either backend) go through these functions; the split works on generated text only.

Thinking models write their reasoning inside `<think>...</think>` before the answer (Qwen3, DeepSeek-R1, SmolLM3),
and their templates print an assistant message's `reasoning_content` there (Qwen3's only for the turns after the
last user message: older reasoning is dropped from the history). `chat_template_kwargs` such as
`{"enable_thinking": false}` (Qwen3, SmolLM3) end the generation prompt with an empty block,
`<think>\\n\\n</think>\\n\\n`, so the model answers at once.

Policies for `reasoning_content` in training data (`data.reasoning`):
- `auto`: the message goes to the template as it is; the template decides what is printed (and so learned).
- `train`: as auto, and every learnable turn's reasoning must be among its learnable tokens (checked by
  tokenize_chat): a template that drops it (Qwen3, for a turn before the last user message) is an error.
- `drop`: `reasoning_content` is removed from every message before rendering."""

from __future__ import annotations

from typing import Literal

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
Policy = Literal["auto", "train", "drop"]
POLICIES: tuple[str, ...] = Policy.__args__
# OpenAI's reasoning_effort values; "none" and "minimal" ask for no reasoning at all from a template that can
# only switch it on or off.
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
_NO_THINKING = ("none", "minimal")


def thinks(template: str) -> bool:
    """Whether a chat template writes reasoning in `<think>` tags, so that replies are split (`ReasoningSplit`)."""
    return THINK_OPEN in template


def for_policy(messages: list[dict], policy: Policy) -> list[dict]:
    """The messages as the template gets them under `policy`: without `reasoning_content` under "drop"."""
    if policy != "drop" or not any("reasoning_content" in m for m in messages):
        return messages
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]


def effort_kwargs(effort: str | None, template: str) -> dict:
    """The chat template variables that carry OpenAI's `reasoning_effort` to `template`: `enable_thinking` (Qwen3,
    SmolLM3: false for "none" and "minimal", else true) and `reasoning_effort` itself (gpt-oss reads it), each
    only where the template reads it; {} for a template that knows neither (the effort then changes nothing)."""
    if effort is None:
        return {}
    out = {}
    if "enable_thinking" in template:
        out["enable_thinking"] = effort not in _NO_THINKING
    if "reasoning_effort" in template:
        out["reasoning_effort"] = effort
    return out


def opens_thinking(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether a generation prompt ends inside an open `<think>` block (templates that start the reply's
    reasoning for the model, e.g. DeepSeek-R1's): the reply then begins as reasoning, without the tag."""
    tail = tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


class ReasoningSplit:
    """A reply split into (reasoning, content) as it grows: `feed(text)` returns the pieces of each that are
    final, `end()` the rest; whole replies go through the same code (`split_reasoning`), so streamed pieces add
    up to the whole reply's parts exactly.

    What is inside `<think>...</think>` is reasoning, without the blank lines the template puts around it (a
    second block's reasoning follows the first's after a blank line); the rest is content, without the tags,
    without the blank space after a closing tag, and without blank space before an opening tag at the reply's
    start. A reply without tags is all content, as written; a block still open at the end is all reasoning.
    Text that may be the start of a tag, and blank space whose fate is not known yet, is held back."""

    def __init__(self, opened: bool = False):
        self.inside = opened  # within a think block (the prompt may have opened one)
        self.pending = ""  # not yet read: may hold the start of a tag
        self.held = ""  # blank space held back: trailing in a block, or before anything at the reply's start
        self.lead = "drop" if opened else "hold"  # blank space at a block's start, after a tag, or the reply's start
        self.reasoned = False  # some reasoning went out (a later block is set apart from it)

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that can go out now."""
        self.pending += text
        out = ([], [])
        while True:
            tags = (THINK_CLOSE,) if self.inside else (THINK_OPEN, THINK_CLOSE)
            found = min(((at, tag) for tag in tags if (at := self.pending.find(tag)) >= 0), default=None)
            if found is None:
                break
            at, tag = found
            self._text(self.pending[:at], out)
            self.pending = self.pending[at + len(tag):]
            self._tag(tag)
        # Hold back what may begin a tag: the longest tail that is a tag's start.
        hold = max((k for tag in tags for k in range(min(len(tag) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(tag[:k])), default=0)
        self._text(self.pending[:len(self.pending) - hold], out)
        self.pending = self.pending[len(self.pending) - hold:]
        return "".join(out[0]), "".join(out[1])

    def end(self) -> tuple[str, str]:
        """What was held back and is final now: a tag's start that never completed is text; blank space at the
        end of reasoning is dropped, a reply of nothing but blank space is content."""
        out = ([], [])
        self._text(self.pending, out)
        self.pending = ""
        if not self.inside and self.lead == "hold":
            out[1].append(self.held)
        self.held = ""
        return "".join(out[0]), "".join(out[1])

    def _tag(self, tag: str) -> None:
        if tag == THINK_OPEN:
            self.inside, self.lead = True, "drop"
        elif self.inside:
            self.inside = False
            self.lead = "drop"
        self.held = ""  # blank space before a tag is the template's (a stray closing tag just goes)

    def _text(self, text: str, out: tuple[list, list]) -> None:
        if not text:
            return
        text = self.held + text
        self.held = ""
        if self.lead is not None:  # nothing of this part went out yet
            if not text.strip():
                self.held = "" if self.lead == "drop" and not self.inside else text
                return
            if self.lead == "drop":
                text = text.lstrip()
            if self.inside and self.reasoned:
                text = "\n\n" + text
            self.lead = None
        if self.inside:  # blank space at the end of reasoning may be the template's: held until text follows
            body = text.rstrip()
            self.held = text[len(body):]
            out[0].append(body)
            self.reasoned = True
        else:
            out[1].append(text)


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a whole reply (see `ReasoningSplit`); reasoning None when there is none."""
    split = ReasoningSplit(opened)
    reasoning, content = split.feed(text)
    more_reasoning, more_content = split.end()
    return (reasoning + more_reasoning) or None, content + more_content

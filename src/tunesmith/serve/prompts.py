"""Prompt token ids for the server: completion prompts, chat messages (with the tools they may call) and a
conversation's trimmed history, each checked against the context window before it is tokenized. No HTTP here,
only `APIError`s to answer."""

from __future__ import annotations

from ..data.templates import chat_template_for, render_chat
from ..data.tokenize import MaskError, encode_chat_prompt
from ..generation import prompt_ids
from .conversations import ConversationStore, fit_history, pinned
from ..generation import Engine
from .errors import APIError


class Prompts:
    """Prompt token ids, with the context window checked before tokenizing. No token covers more characters
    than the longest entry of the vocabulary, so a text of C characters has at least C / longest tokens: a
    prompt that certainly overflows the window is refused after rendering, without tokenizing it (tokenizing
    with special-token protection costs seconds for megabytes). Called in worker threads."""

    def __init__(self, engine: Engine):
        self.tokenizer, self.template, self.window = engine.tokenizer, engine.chat_template, engine.context_window
        self.chat_template = chat_template_for(self.tokenizer, self.template)  # the text chat prompts render with
        self.longest = max(map(len, self.tokenizer.get_vocab()), default=1) or 1

    def budget(self, n_prompt: int, max_tokens: int | None, default: int | None, param: str, *,
               at_least: bool = False) -> int:
        """Tokens the reply may have; context_length_exceeded if the prompt (and max_tokens) do not fit."""
        window, size = self.window, f"at least {n_prompt}" if at_least else f"{n_prompt}"
        if n_prompt >= window:
            raise APIError(400, f"This model's maximum context length is {window} tokens, but the {param} has "
                           f"{size} tokens, leaving no room for a reply.", param=param, code="context_length_exceeded")
        if max_tokens is None:
            return min(default or window, window - n_prompt)
        if n_prompt + max_tokens > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens, but {size} tokens are in "
                           f"the {param} and {max_tokens} were requested for the completion. Reduce the {param} or "
                           "max_tokens.", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def _at_least(self, text: str) -> int:
        return -(-len(text) // self.longest)

    def _render(self, messages: list[dict], tools: list[dict] | None, kwargs: dict | None) -> str:
        try:
            return render_chat(self.tokenizer, messages, add_generation_prompt=True, chat_template=self.template,
                               tools=tools, chat_template_kwargs=kwargs)
        except Exception as err:  # a template that rejects this conversation (e.g. roles out of order)
            raise APIError(400, f"The chat template cannot render these messages: {err}", param="messages") from None

    def _encode(self, messages: list[dict], tools: list[dict] | None, kwargs: dict | None) -> list[int]:
        try:
            return encode_chat_prompt(self.tokenizer, messages, chat_template=self.template, tools=tools,
                                      chat_template_kwargs=kwargs)
        except MaskError as err:  # content that could only be kept from forging a role by refusing it
            raise APIError(400, f"These messages cannot be encoded safely: {err}", param="messages") from None

    def count(self, messages: list[dict], tools: list[dict] | None = None, kwargs: dict | None = None) -> int:
        """Prompt tokens of `messages`, or a lower bound when that is already more than the window."""
        if (low := self._at_least(self._render(messages, tools, kwargs))) > self.window:
            return low
        return len(self._encode(messages, tools, kwargs))

    def chat(self, messages: list[dict], max_tokens: int | None = None, tools: list[dict] | None = None,
             kwargs: dict | None = None) -> list[int]:
        """The prompt of `messages` with `tools` (OpenAI's entries) rendered as data/tools.py says for the template,
        and `kwargs` as the template's variables (chat_template_kwargs)."""
        self.budget(self._at_least(self._render(messages, tools, kwargs)), max_tokens, None, "messages", at_least=True)
        return self._encode(messages, tools, kwargs)

    def completion(self, prompt: str | list[int], max_tokens: int | None = None) -> list[int]:
        if not isinstance(prompt, str):  # token ids, as lm-evaluation-harness sends them
            if (bad := next((t for t in prompt if t >= len(self.tokenizer)), None)) is not None:
                raise APIError(400, f"The prompt's token ids must be below {len(self.tokenizer)} (this model's "
                               f"vocabulary); {bad} is not a token.", param="prompt")
            self.budget(len(prompt), max_tokens, None, "prompt")
            return list(prompt)
        self.budget(self._at_least(prompt), max_tokens, None, "prompt", at_least=True)
        ids = prompt_ids(self.tokenizer, prompt=prompt)
        if not ids:  # an empty prompt: generate from the start of a document, as OpenAI does
            start = next((t for t in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id) if t is not None), None)
            if start is None:
                raise APIError(400, "The prompt is empty and this model has no start-of-text token to begin from; "
                               "send some text.", param="prompt")
            ids = [start]
        return ids

    def history(self, store: ConversationStore, conversation: dict, new: list[dict], reserve: int,
                tools: list[dict] | None = None, kwargs: dict | None = None) -> list[dict]:
        """The prompt messages of a conversation's next turn, trimmed to the window (in a worker thread)."""
        stored = [{k: v for k, v in m.items() if k != "created_at"} for m in store.messages(conversation["id"])]
        system, history = pinned(conversation["system"], stored)
        fitted = fit_history(system, history, new, lambda messages: self.count(messages, tools, kwargs),
                             self.window - reserve)
        if fitted is None:
            raise APIError(400, f"The system prompt and the new messages leave no room for a {reserve}-token "
                           f"reply in the {self.window}-token context window.", param="messages",
                           code="context_length_exceeded")
        return fitted

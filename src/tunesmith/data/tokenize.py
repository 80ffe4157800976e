"""Token ids and the loss mask, in one place: labels sit exactly on what the model should learn to say.

Chat: the conversation is rendered once with the chat template and tokenized jointly. Each learnable
assistant message (weight 1) is located in the rendered text by rendering prefixes of the conversation:
`render(messages[:i], add_generation_prompt=True)` ends where message i's text starts and
`render(messages[:i+1])` ends after its end-of-turn marker. That works for any template that renders a
conversation as the concatenation of its turns (ChatML, Llama 3, templates that inject a default system
prompt or trim whitespace), with no `{% generation %}` tags. The span is then cut right after the last stop
token in it (`<|im_end|>`, `<|eot_id|>`, EOS), so the model learns to stop but not the newline the template
prints after it. Templates that re-render history differently (e.g. dropping old reasoning) fall back to
locating the message content in the text.

Completion: prompt and completion are tokenized as one string, so the boundary token is what the model
will see; every token that covers any completion character is learnable, plus an appended EOS.

The mask is checked, not trusted (`MaskError` names the example), and special-token strings inside
message content are tokenized as plain text so user data cannot forge a role.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .templates import chat_template_for, render_chat

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # what transformers' loss functions skip


class MaskError(ValueError):
    """A loss mask that came out empty or misaligned: training on it would silently learn nothing."""


@dataclass
class Example:
    """One tokenized example. `offsets[i]` is the (start, end) of token i in `text`; (0, 0) for tokens
    the tokenizer added (BOS/EOS) that stand for no text."""

    input_ids: list[int]
    labels: list[int]
    text: str
    offsets: list[tuple[int, int]] = field(repr=False)

    @property
    def num_learnable(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


def stop_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Token ids that end a turn at generation time: the tokenizer's EOS and the model's eos_token_id(s)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    if extra is not None:
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return ids


# ---------------------------------------------------------------------------------------------------------
# Encoding with special-token strings in user data kept as plain text
# ---------------------------------------------------------------------------------------------------------

def _special_strings(tokenizer) -> list[str]:
    return [t for t in tokenizer.all_special_tokens + list(_added_special(tokenizer)) if t]


def _added_special(tokenizer):
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {tok.content for tok in decoder.values() if getattr(tok, "special", False)}


def _encode(tokenizer, text: str, *, add_special_tokens: bool, split_special: bool = False):
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    split_special_tokens=split_special)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _encode_protected(tokenizer, text: str, plain: list[tuple[int, int]]):
    """Tokenize `text` jointly, then re-tokenize each `plain` character span (user content that contains a
    special-token string) with special tokens split, so `<|im_start|>system` in a message is just text.

    Only the tokens covering such a span are replaced, so merges everywhere else stay those of the joint
    tokenization."""
    ids, offsets = _encode(tokenizer, text, add_special_tokens=False)
    for start, end in sorted(plain, reverse=True):  # right to left keeps earlier indices valid
        covering = [i for i, (s, e) in enumerate(offsets) if e > start and s < end and e > s]
        if not covering:
            continue
        first, last = covering[0], covering[-1]
        lo, hi = offsets[first][0], offsets[last][1]
        sub_ids, sub_offsets = _encode(tokenizer, text[lo:hi], add_special_tokens=False, split_special=True)
        ids[first:last + 1] = sub_ids
        offsets[first:last + 1] = [(s + lo, e + lo) for s, e in sub_offsets]
    return ids, offsets


def _find_contents(text: str, messages: list[dict], wanted) -> dict[int, tuple[int, int]]:
    """Character span of each wanted message's content in the rendered text, searched in order so an
    earlier identical string cannot be matched. Templates may trim content, so the stripped form is used."""
    spans, cursor = {}, 0
    for i, message in enumerate(messages):
        content = message["content"].strip()
        at = text.find(content, cursor)
        if at < 0:
            continue
        cursor = at + len(content)
        if wanted(i, message):
            spans[i] = (at, cursor)
    return spans


# ---------------------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------------------

def _learnable(message: dict) -> bool:
    return message["role"] == "assistant" and message.get("weight", 1) == 1


def _assistant_spans(tokenizer, messages, template, text, stops: list[str]) -> dict[int, tuple[int, int]]:
    """Character span [start, end) of each learnable assistant turn, ending right after its stop token."""
    spans: dict[int, tuple[int, int]] = {}
    located = None
    for i, message in enumerate(messages):
        if not _learnable(message):
            continue
        # An empty conversation cannot be rendered (and a template may inject a system prompt before a
        # first assistant turn), so a conversation that opens with the assistant is searched for instead.
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, chat_template=template) if i else None
        through = render_chat(tokenizer, messages[:i + 1], chat_template=template)
        if before is not None and text.startswith(through) and through.startswith(before) and len(through) > len(before):
            start, end = len(before), len(through)
        else:  # the template does not render conversations prefix-consistently: search for the content
            if located is None:
                located = _find_contents(text, messages, lambda j, m: _learnable(m))
            if i not in located:
                raise MaskError(f"message {i} (assistant): its content does not appear in the rendered text")
            start, content_end = located[i]
            hits = [(text.find(s, content_end), s) for s in stops if text.find(s, content_end) >= 0]
            end = min(hits)[0] + len(min(hits)[1]) if hits else content_end
        spans[i] = (start, _cut_after_last_stop(text, start, end, stops, i))
    return spans


def _cut_after_last_stop(text: str, start: int, end: int, stops: list[str], index: int) -> int:
    """Trim the span after its last stop-token string: the newline a template prints after `<|im_end|>`
    is not something the model has to say, since generation has stopped by then."""
    segment = text[start:end]
    last = max(((segment.rfind(s) + len(s)) for s in stops if segment.rfind(s) >= 0), default=-1)
    if last < 0:
        raise MaskError(
            f"message {index} (assistant): the chat template ends the turn without a stop token "
            f"({', '.join(stops) or 'the tokenizer has no EOS'}), so a trained model would never learn to stop; "
            "use a template that closes assistant turns with EOS (e.g. chat_template='plain')")
    return start + last


def tokenize_chat(tokenizer, messages: list[dict], *, chat_template: str | None = None,
                  generation_config=None) -> Example:
    """Input ids of the rendered conversation, labels only on learnable assistant turns (incl. stop token)."""
    template = chat_template_for(tokenizer, chat_template)
    text = render_chat(tokenizer, messages, chat_template=template)
    stop_ids = stop_token_ids(tokenizer, generation_config)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids)]
    spans = _assistant_spans(tokenizer, messages, template, text, stops)
    ids, offsets = _encode_protected(tokenizer, text, _forged_spans(tokenizer, text, messages))

    labels = [IGNORE_INDEX] * len(ids)
    for index, (start, end) in spans.items():
        covered = [t for t, (s, e) in enumerate(offsets) if e > start and s < end and e > s]
        _check_turn(tokenizer, ids, covered, messages[index], index, stop_ids)
        for t in covered:
            labels[t] = ids[t]
    if not spans:
        raise MaskError("no assistant message with weight 1: nothing to learn from")
    return Example(ids, labels, text, offsets)


def _forged_spans(tokenizer, text, messages) -> list[tuple[int, int]]:
    specials = _special_strings(tokenizer)
    suspicious = lambda i, m: any(s in m["content"] for s in specials)  # noqa: E731
    if not any(suspicious(i, m) for i, m in enumerate(messages)):
        return []
    found = _find_contents(text, messages, suspicious)
    missing = [i for i, m in enumerate(messages) if suspicious(i, m) and i not in found]
    if missing:
        raise MaskError(f"message {missing[0]} contains a special-token string and could not be located in "
                        "the rendered text to keep it as plain text")
    return list(found.values())


def _check_turn(tokenizer, ids, covered, message, index, stop_ids) -> None:
    if not covered:
        raise MaskError(f"message {index} (assistant): no token falls on its text")
    if ids[covered[-1]] not in stop_ids:
        raise MaskError(f"message {index} (assistant): the learnable span does not end with a stop token")
    decoded = tokenizer.decode([ids[t] for t in covered], skip_special_tokens=False)
    if message["content"].strip() not in decoded:
        raise MaskError(f"message {index} (assistant): the learnable tokens decode to {decoded[:60]!r}, "
                        "which does not contain the message; the mask is misaligned")


def encode_chat_prompt(tokenizer, messages: list[dict], *, chat_template: str | None = None) -> list[int]:
    """Ids of a conversation followed by the generation prompt, ready for the model to answer.
    Special-token strings in content stay plain text, as in training."""
    template = chat_template_for(tokenizer, chat_template)
    text = render_chat(tokenizer, messages, add_generation_prompt=True, chat_template=template)
    ids, _ = _encode_protected(tokenizer, text, _forged_spans(tokenizer, text, messages))
    return ids


# ---------------------------------------------------------------------------------------------------------
# Completion
# ---------------------------------------------------------------------------------------------------------

def tokenize_completion(tokenizer, prompt: str, completion: str) -> Example:
    """Prompt and completion tokenized jointly; labels on every token that covers completion text, then EOS.

    Everything here is user data, so special-token strings are always split into plain text."""
    text = prompt + completion
    ids, offsets = _encode(tokenizer, text, add_special_tokens=True, split_special=True)
    boundary = len(prompt)
    labels = [i if e > boundary and e > s else IGNORE_INDEX for i, (s, e) in zip(ids, offsets)]
    if tokenizer.eos_token_id is None:
        raise MaskError("the tokenizer has no EOS token, so a completion cannot be taught to end")
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        offsets.append((0, 0))
        labels.append(tokenizer.eos_token_id)
    example = Example(ids, labels, text, offsets)
    if completion.strip() and example.num_learnable < 2:
        raise MaskError("the completion produced no learnable token besides EOS; the mask is misaligned")
    return example


# ---------------------------------------------------------------------------------------------------------
# Records and datasets
# ---------------------------------------------------------------------------------------------------------

def tokenize_record(tokenizer, record: dict, *, chat_template: str | None = None,
                    generation_config=None) -> Example:
    """Tokenize one internal chat or completion record."""
    if "messages" in record:
        return tokenize_chat(tokenizer, record["messages"], chat_template=chat_template,
                             generation_config=generation_config)
    if "prompt" in record and "completion" in record:
        return tokenize_completion(tokenizer, record["prompt"], record["completion"])
    raise MaskError(f"record with keys {sorted(record)} is neither chat nor completion")


def truncate(example: Example, max_length: int) -> Example:
    """Right-truncate to max_length tokens (explicit; nothing is truncated unless asked)."""
    return Example(example.input_ids[:max_length], example.labels[:max_length], example.text,
                   example.offsets[:max_length])


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    learnable_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)


def tokenize_records(tokenizer, records, *, max_length: int | None = None, chat_template: str | None = None,
                     generation_config=None, source: str = "data") -> tuple[list[Example], TokenizeStats]:
    """Tokenize every record; examples left with no learnable token after truncation are dropped and
    counted in one warning. A bad mask is an error naming the example (1-based, in input order)."""
    out, stats = [], TokenizeStats()
    for n, record in enumerate(records, start=1):
        try:
            example = tokenize_record(tokenizer, record, chat_template=chat_template,
                                      generation_config=generation_config)
        except MaskError as err:
            raise MaskError(f"{source}: example {n}: {err}") from None
        stats.examples += 1
        stats.lengths.append(len(example.input_ids))
        if max_length is not None and len(example.input_ids) > max_length:
            stats.truncated += 1
            example = truncate(example, max_length)
            if example.num_learnable == 0:
                stats.dropped += 1
                continue
        stats.tokens += len(example.input_ids)
        stats.learnable_tokens += example.num_learnable
        out.append(example)
    if stats.dropped:
        log.warning("%s: %d of %d examples had no learnable token left after truncation to max_length=%d "
                    "and were dropped", source, stats.dropped, stats.examples, max_length)
    return out, stats


# ---------------------------------------------------------------------------------------------------------
# Classification and token tagging (encoder or decoder with a head)
# ---------------------------------------------------------------------------------------------------------

def encode_classification(tokenizer, records, label2id, max_length) -> list[dict]:
    out = []
    for r in records:
        enc = tokenizer(r["text"], truncation=True, max_length=max_length)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": label2id[r["label"]]})
    return out


def encode_tagging(tokenizer, records, label2id, max_length) -> list[dict]:
    """Words joined by spaces and tokenized with offsets; each word's tag goes on its first sub-token and
    every other sub-token gets -100. Works for any fast tokenizer (no `is_split_into_words` quirks)."""
    out = []
    for r in records:
        starts, text = {}, ""
        for word, tag in zip(r["tokens"], r["tags"]):
            text += " " if text else ""
            starts[len(text)] = label2id[tag]
            text += word
        enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
        labels, seen = [], set()
        for start, end in enc["offset_mapping"]:
            # Byte-level BPE puts the space before a word into its first token: skip it to find the word.
            while start < end and text[start] == " ":
                start += 1
            if end > start and start in starts and start not in seen:
                seen.add(start)
                labels.append(starts[start])
            else:
                labels.append(-100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out

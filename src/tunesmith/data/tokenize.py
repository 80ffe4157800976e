"""Token ids and the loss mask, in one place: labels sit exactly on what the model should learn to say.

Chat: the conversation is rendered once with the chat template and tokenized jointly. Where each message's
content sits in that text is known exactly, from a second rendering with placeholders (`render_chat_spans`),
never by searching for it. Each learnable assistant message (weight 1) is located by rendering prefixes of
the conversation: `render(messages[:i], add_generation_prompt=True)` ends where message i's text starts and
`render(messages[:i+1])` ends after its end-of-turn marker. That works for any template that renders a
conversation as the concatenation of its turns (ChatML, Llama 3, Gemma, templates that inject a default
system prompt or trim whitespace), with no `{% generation %}` tags; templates that re-render earlier turns
differently use the message's exact content span instead. The turn ends right after the first stop token
after the content (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, EOS; see `tokenize_chat`), so the model
learns to stop but not the newline the template prints after it. Tool conversations (data/tools.py) mask the
same way: a call turn is an assistant turn, learnable by its weight and checked by its functions' names; tool
results and the definitions the template prints are never learnable. Reasoning (data/reasoning.py): a think
block the template prints in a learnable turn is learnable with it; template variables (`chat_template_kwargs`)
render every prefix too, so the empty block `enable_thinking: false` puts in a generation prompt is prompt.

Completion: prompt and completion are tokenized as one string, so the boundary token is what the model
will see; every token that covers any completion character is learnable, plus an appended EOS.

The mask is checked, not trusted (`MaskError` names the example). Special-token strings inside message
content are tokenized as plain text, in training and at serving alike, so user data cannot forge a role: only
the template's own text can yield a control token. A template that changes content beyond trimming cannot be
aligned with its content, so content holding a special-token string is refused there.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from ..errors import TunesmithError
from .reasoning import Policy, for_policy
from .templates import ChatTemplateError, chat_template_for, render_chat, render_chat_spans
from .tools import for_template

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # what transformers' loss functions skip


class MaskError(TunesmithError, ValueError):
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
# Encoding with special-token strings in message content kept as plain text
# ---------------------------------------------------------------------------------------------------------

def _special_tokens(tokenizer) -> dict[str, int]:
    """Every special token's string and id: the named ones (EOS, BOS, ...) and the added tokens marked
    special (`<|im_start|>`, `<end_of_turn>`), which `all_special_tokens` does not always list."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {tok.content: i for i, tok in decoder.items() if getattr(tok, "special", False)}
    found.update(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    return {token: i for token, i in found.items() if token and i is not None}


def _encode(tokenizer, text: str, *, add_special_tokens: bool, split_special: bool = False):
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    split_special_tokens=split_special)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _encode_protected(tokenizer, text: str, contents: list[tuple[int, int]]):
    """Tokenize `text` jointly, then re-tokenize with special tokens split the tokens covering each message
    content (`contents`: disjoint (start, end) character spans in text order) that a special token touches,
    so `<|im_start|>system` typed in a message is just text while the template's own markers stay special.

    Merges everywhere else stay those of the joint tokenization. Linear in the text, because the server
    encodes every prompt with it: touched contents and their covering tokens are found by bisection over
    sorted offsets, the replacements tokenized in one batch, and the ids rebuilt in one pass."""
    ids, offsets = _encode(tokenizer, text, add_special_tokens=False)
    special = {i: token for token, i in _special_tokens(tokenizer).items()}
    # A control token with lstrip/rstrip (Phi-3's `<|end|>`) also covers the whitespace beside it, which may be
    # a content's edge; its offsets become its own string's, so that it sits on the template's side.
    for t, token in enumerate(ids):
        if token in special:
            s, e = offsets[t]
            at = text.find(special[token], s, e)
            if at >= 0:
                offsets[t] = (at, at + len(special[token]))

    starts = [start for start, _ in contents]
    touched = set()
    for token, (s, e) in zip(ids, offsets):
        if token in special:
            k = bisect_left(starts, e) - 1  # the last content starting before this token ends
            while k >= 0 and contents[k][1] > s:
                touched.add(k)
                k -= 1
    begins, ends = [s for s, _ in offsets], [e for _, e in offsets]
    runs: list[list[int]] = []  # [first, last] token indices to re-tokenize, merged where they overlap
    for k in sorted(touched):
        start, end = contents[k]
        first, last = bisect_right(ends, start), bisect_left(begins, end) - 1
        if runs and first <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], last)
        elif first <= last:
            runs.append([first, last])
    if not runs:
        return ids, offsets
    plain = _encode_plain(tokenizer, [text[offsets[first][0]:offsets[last][1]] for first, last in runs])
    # Checked, not trusted: a tokenizer that ignores split_special_tokens, or whose plain-text merges reach a
    # control token, would hand the content a role after all.
    if forged := next((i for sub_ids, _ in plain for i in sub_ids if i in special), None):
        raise MaskError(f"the tokenizer turns the plain text of a message into the control token "
                        f"{special[forged]!r}, so message content cannot be kept from forging a role")
    out_ids, out_offsets, done = [], [], 0
    for (first, last), (sub_ids, sub_offsets) in zip(runs, plain):
        lo = offsets[first][0]
        out_ids += ids[done:first] + sub_ids
        out_offsets += offsets[done:first] + [(s + lo, e + lo) for s, e in sub_offsets]
        done = last + 1
    return out_ids + ids[done:], out_offsets + offsets[done:]


def _encode_plain(tokenizer, pieces: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Ids and offsets of each piece with special tokens split, tokenized as if mid-text: after a newline
    that is then dropped, so a SentencePiece tokenizer adds no prefix space (transformers'
    `encode_marked_chat` uses the same trick). A piece the newline merges into is tokenized alone."""
    newline, _ = _encode(tokenizer, "\n", add_special_tokens=False, split_special=True)
    enc = tokenizer(["\n" + piece for piece in pieces], add_special_tokens=False, return_offsets_mapping=True,
                    split_special_tokens=True)
    out, n = [], len(newline)
    for piece, ids, offsets in zip(pieces, enc["input_ids"], enc["offset_mapping"]):
        if ids[:n] == newline and (len(ids) == n or offsets[n][0] >= 1):
            out.append((ids[n:], [(s - 1, e - 1) for s, e in offsets[n:]]))
        else:
            out.append(_encode(tokenizer, piece, add_special_tokens=False, split_special=True))
    return out


# ---------------------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------------------

def _learnable(message: dict) -> bool:
    return message["role"] == "assistant" and message.get("weight", 1) == 1


def _render(tokenizer, messages, template, *, add_generation_prompt=False, tools=None, chat_template_kwargs=None):
    """The rendered text and each content's exact (message index, start, end) span, or None for a template
    that changes content. Plain content is fine then, but content holding a special-token string could not
    be told apart from the template's text, so it is refused rather than guessed at; so is reasoning holding
    one, which the template prints as its own text."""
    text, spans = render_chat_spans(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                    chat_template=template, tools=tools, chat_template_kwargs=chat_template_kwargs)
    if spans is not None and not any(m.get("reasoning_content") for m in messages):
        return text, spans  # the common case, each served prompt: nothing to look for
    specials = sorted(_special_tokens(tokenizer), key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, specials)) or "(?!)")
    for i, message in enumerate(messages):
        if found := pattern.search(message.get("reasoning_content") or ""):
            raise MaskError(f"message {i} ({message['role']}): its reasoning_content contains the special-token "
                            f"string {found.group()!r}, which the chat template would print as a control token; "
                            "remove it from the reasoning")
        if spans is None and (found := pattern.search(message.get("content") or "")):
            raise MaskError(
                f"message {i} ({message['role']}) contains the special-token string {found.group()!r}, and "
                "the chat template changes message content (beyond trimming whitespace), so it cannot be "
                "kept as plain text; remove it from the data or use a template that prints content as given")
    return text, spans


def _content_spans(spans) -> list[tuple[int, int]]:
    return [(start, end) for _, start, end in spans or () if end > start]


def _turn_end_ids(tokenizer, messages, text, spans) -> set[int]:
    """Special tokens the template prints right after every assistant message, e.g. Gemma's `<end_of_turn>`
    (whose EOS is `<eos>`) or Llama 3's `<|eot_id|>` (EOS `<|end_of_text|>`)."""
    specials, common = _special_tokens(tokenizer), None
    for k, (i, _, end) in enumerate(spans or ()):
        if messages[i]["role"] != "assistant":
            continue
        # Between two contents there is only template text.
        after = text[end:spans[k + 1][1] if k + 1 < len(spans) else len(text)].lstrip()
        here = {tid for token, tid in specials.items() if after.startswith(token)}
        common = here if common is None else common & here
    return common or set()


def _assistant_spans(render, messages, text, spans, stops) -> dict[int, tuple[int, int]]:
    """Character span [start, end) of each learnable assistant turn, ending right after its stop token. The
    prefixes render (`render(messages, add_generation_prompt)`) with the same tools and template variables as
    the whole, since a template prints tools ahead of every turn and `enable_thinking` in the generation prompt."""
    printed: dict[int, list[tuple[int, int, int]]] = {}  # index -> (start, end, next content's start)
    for k, (i, start, end) in enumerate(spans or ()):
        printed.setdefault(i, []).append((start, end, spans[k + 1][1] if k + 1 < len(spans) else len(text)))
    turns: dict[int, tuple[int, int]] = {}
    for i, message in enumerate(messages):
        if not _learnable(message):
            continue
        # An empty conversation cannot be rendered (and a template may inject a system prompt before a
        # first assistant turn), so a conversation that opens with the assistant uses its content span.
        before = render(messages[:i], True) if i else None
        through = render(messages[:i + 1], False)
        if before is not None and text.startswith(through) and through.startswith(before) \
                and len(through) > len(before):
            start, end = len(before), len(through)
            # The stop token is looked for after the content only: the content may spell one as text.
            inside = [e for s, e, _ in printed.get(i, ()) if start <= s and e <= end]
            turns[i] = (start, _cut_after_stop(text, inside[-1] if inside else start, end, stops, i))
        elif len(printed.get(i, ())) == 1:
            # Prefixes of the conversation are not prefixes of the whole (the template re-renders history,
            # or injects text before a first assistant turn): the turn is the exact content span plus the
            # template's text up to the first stop token after it.
            start, content_end, next_start = printed[i][0]
            turns[i] = (start, _cut_after_stop(text, content_end, next_start, stops, i))
        else:
            raise MaskError(f"message {i} (assistant): the chat template neither renders the conversation turn "
                            "by turn nor prints this message's content exactly once, so its turn cannot be located")
    return turns


def _cut_after_stop(text: str, tail: int, end: int, stops: list[str], index: int) -> int:
    """End the turn right after the first stop-token string in the template's text[tail:end], where
    generation stops: the newline a template prints after `<|im_end|>`, or an EOS it adds after the
    end-of-turn token (Phi-3), is not something the model has to say."""
    segment = text[tail:end]
    found = [(at, at + len(s)) for at, s in ((segment.find(s), s) for s in stops) if at >= 0]
    if not found:
        raise MaskError(
            f"message {index} (assistant): the chat template ends the turn without a stop token "
            f"({', '.join(stops) or 'the tokenizer has no EOS'}), so a trained model would never learn to stop; "
            "pass the model's generation_config if its end-of-turn token is not EOS, or use a template that "
            "closes assistant turns with EOS (e.g. chat_template='plain')")
    return tail + min(found)[1]


def tokenize_chat(tokenizer, messages: list[dict], *, chat_template: str | None = None,
                  generation_config=None, tools: list[dict] | None = None,
                  chat_template_kwargs: dict | None = None, reasoning: Policy = "auto") -> Example:
    """Input ids of the rendered conversation, labels only on learnable assistant turns (incl. stop token).

    A turn ends with a stop token: the tokenizer's EOS or one of `generation_config.eos_token_id`. Pass the
    model's generation_config when its turns end with something other than EOS (Gemma's `<end_of_turn>`,
    Llama 3's `<|eot_id|>`), since that is what generation will stop on. Without one (or without an
    eos_token_id in it), a special token that the template prints right after every assistant message in
    this conversation also counts, so such templates still train to stop.

    `chat_template_kwargs` are template variables for every rendering (Qwen3's `enable_thinking: false` puts
    an empty think block in the generation prompt, so it is not learned); `reasoning` is the policy for
    assistant `reasoning_content` (data/reasoning.py): a learned turn's think block is learnable with the rest
    of the turn, and under "train" every learnable turn's reasoning must be among its learnable tokens."""
    template = chat_template_for(tokenizer, chat_template)
    messages, tools = for_template(for_policy(messages, reasoning), tools, template)
    text, spans = _render(tokenizer, messages, template, tools=tools, chat_template_kwargs=chat_template_kwargs)
    stop_ids = stop_token_ids(tokenizer, generation_config)
    if getattr(generation_config, "eos_token_id", None) is None:
        stop_ids |= _turn_end_ids(tokenizer, messages, text, spans)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids)]

    def render(part: list[dict], add_generation_prompt: bool) -> str:
        return render_chat(tokenizer, part, add_generation_prompt=add_generation_prompt, chat_template=template,
                           tools=tools, chat_template_kwargs=chat_template_kwargs)

    turns = _assistant_spans(render, messages, text, spans, stops)
    ids, offsets = _encode_protected(tokenizer, text, _content_spans(spans))

    labels = [IGNORE_INDEX] * len(ids)
    begins, ends = [s for s, _ in offsets], [e for _, e in offsets]
    for index, (start, end) in turns.items():
        covered = [t for t in range(bisect_right(ends, start), bisect_left(begins, end)) if ends[t] > begins[t]]
        _check_turn(tokenizer, ids, covered, messages[index], index, stop_ids, reasoning)
        for t in covered:
            labels[t] = ids[t]
    if not turns:
        raise MaskError("no assistant message with weight 1: nothing to learn from")
    return Example(ids, labels, text, offsets)


def _check_turn(tokenizer, ids, covered, message, index, stop_ids, reasoning: Policy = "auto") -> None:
    if not covered:
        raise MaskError(f"message {index} (assistant): no token falls on its text")
    if ids[covered[-1]] not in stop_ids:
        raise MaskError(f"message {index} (assistant): the learnable span does not end with a stop token")
    decoded = tokenizer.decode([ids[t] for t in covered], skip_special_tokens=False)
    # A call turn is checked by its functions' names: templates print the call in their own way (Llama 3.1
    # as {"name": ..., "parameters": ...}, and without the turn's text).
    expected = [c["function"]["name"] for c in message["tool_calls"]] if message.get("tool_calls") \
        else [message["content"].strip()]
    if missing := next((part for part in expected if part not in decoded), None):
        raise MaskError(f"message {index} (assistant): the learnable tokens decode to {decoded[:60]!r}, "
                        f"which does not contain {missing[:40]!r}; the mask is misaligned")
    thought = (message.get("reasoning_content") or "").strip()
    if reasoning == "train" and thought and thought not in decoded:
        raise MaskError(f"message {index} (assistant): reasoning is 'train', but the chat template does not print "
                        f"this turn's reasoning_content ({thought[:40]!r}) within the turn (Qwen3's prints it "
                        "only for turns after the last user message; templates without thinking never do); use "
                        "reasoning 'auto' to learn what the template keeps, or one conversation per reasoned turn")


def encode_chat_prompt(tokenizer, messages: list[dict], *, chat_template: str | None = None,
                       tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> list[int]:
    """Ids of a conversation followed by the generation prompt, ready for the model to answer.
    Special-token strings in content stay plain text, as in training; linear in the conversation's size."""
    template = chat_template_for(tokenizer, chat_template)
    messages, tools = for_template(messages, tools, template)
    text, spans = _render(tokenizer, messages, template, add_generation_prompt=True, tools=tools,
                          chat_template_kwargs=chat_template_kwargs)
    ids, _ = _encode_protected(tokenizer, text, _content_spans(spans))
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

def tokenize_record(tokenizer, record: dict, *, chat_template: str | None = None, generation_config=None,
                    chat_template_kwargs: dict | None = None, reasoning: Policy = "auto") -> Example:
    """Tokenize one internal chat or completion record."""
    if "messages" in record:
        return tokenize_chat(tokenizer, record["messages"], chat_template=chat_template,
                             generation_config=generation_config, tools=record.get("tools"),
                             chat_template_kwargs=chat_template_kwargs, reasoning=reasoning)
    if "prompt" in record and "completion" in record:
        return tokenize_completion(tokenizer, record["prompt"], record["completion"])
    raise MaskError(f"record with keys {sorted(record)} is neither chat nor completion")


def _warn_unread_reasoning(tokenizer, records: list, chat_template, reasoning: Policy, source: str) -> None:
    """Under "auto" a template that never reads reasoning_content (ChatML) drops it silently: say so once."""
    if reasoning != "auto":
        return
    reasoned = sum(any(m.get("reasoning_content") for m in r.get("messages", ())) for r in records)
    if reasoned and "reasoning_content" not in chat_template_for(tokenizer, chat_template):
        log.warning("%s: %d examples have assistant reasoning_content, which this chat template does not print, "
                    "so it is not learned; use a template that renders it (Qwen3's), or set reasoning to drop "
                    "to say it is meant", source, reasoned)


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
                     generation_config=None, source: str = "data", chat_template_kwargs: dict | None = None,
                     reasoning: Policy = "auto") -> tuple[list[Example], TokenizeStats]:
    """Tokenize every record; examples left with no learnable token after truncation are dropped and
    counted in one warning. A bad mask is an error naming the example (1-based, in input order)."""
    out, stats = [], TokenizeStats()
    records = list(records)
    _warn_unread_reasoning(tokenizer, records, chat_template, reasoning, source)
    for n, record in enumerate(records, start=1):
        try:
            example = tokenize_record(tokenizer, record, chat_template=chat_template,
                                      generation_config=generation_config,
                                      chat_template_kwargs=chat_template_kwargs, reasoning=reasoning)
        except (MaskError, ChatTemplateError) as err:
            raise type(err)(f"{source}: example {n}: {err}") from None
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
    """Each record's text cut to max_length tokens (None: not cut), and its label's id (none without label2id:
    texts to label)."""
    out = []
    for r in records:
        enc = tokenizer(r["text"], truncation=max_length is not None, max_length=max_length)
        features = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out.append(features if label2id is None else {**features, "labels": label2id[r["label"]]})
    return out


def encode_tagging(tokenizer, records, label2id, max_length) -> list[dict]:
    """Words joined by spaces and tokenized with offsets (cut to max_length tokens; None: not cut); each word's
    tag goes on its first sub-token and every other sub-token gets -100. Works for any fast tokenizer (no
    `is_split_into_words` quirks)."""
    out = []
    for r in records:
        starts, text = {}, ""
        for word, tag in zip(r["tokens"], r["tags"]):
            text += " " if text else ""
            starts[len(text)] = label2id[tag]
            text += word
        enc = tokenizer(text, truncation=max_length is not None, max_length=max_length, return_offsets_mapping=True)
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


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share (binary search over list slices: C-speed comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    if not hi or a[0] != b[0]:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo

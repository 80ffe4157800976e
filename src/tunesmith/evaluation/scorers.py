"""The scorers of a model on held-out records, one per kind of output: generation (exact match, BLEU, ROUGE-L,
and the loss on the learnable tokens only; with tools, the calls a reply makes against the gold calls),
sequence classification (accuracy, P/R/F1, per-class report,
confusion matrix) and token classification (entity-level P/R/F1 per type), the last two labelling through
heads.py as the server's /classify does. Which one scores a model is decided in one place, `score` (choose.py);
the metric functions live in metrics.py."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from ..batching import batches, device_of, pad
from ..data.reasoning import Policy
from ..data.tokenize import IGNORE_INDEX, chat_template_for, tokenize_records
from ..data.tools import CALL_OPEN, Style, call_style, format_call, has_tools, parse_reply
from ..generation import SamplingParams, generate_batch
from ..heads import encode_texts, encode_words, label_texts, label_words
from ..metrics import classification_metrics, generation_metrics, ner_metrics, reply_matches, tool_metrics
from ..progress import Progress
from .results import Evaluation


@dataclass
class Reference:
    """What an sft record asks of the model and the reply it expects: its last assistant turn, or its completion."""
    request: dict  # {"prompt": ...} or {"messages": [...]}, with "tools" when the record has them
    text: str  # the gold reply; a call turn's calls written as the tool convention prints them
    calls: list[dict] | None = None  # the gold turn's tool_calls (OpenAI's shape); None for a plain reply
    tools: list[dict] | None = None  # the conversation's definitions; None when it involves no tools at all


def split_reference(record: dict) -> Reference:
    """The generation request and gold reply of an sft record: the last assistant turn, or the completion."""
    if "messages" not in record:
        return Reference({"prompt": record["prompt"]}, record["completion"])
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    gold, tools = messages[last], record.get("tools")
    if not has_tools(messages, tools):
        return Reference({"messages": messages[:last]}, gold["content"])
    calls = gold.get("tool_calls") or None
    text = "\n".join(([gold["content"].strip()] if gold.get("content") else [])
                     + [format_call(c["function"]["name"], c["function"]["arguments"]) for c in calls or []])
    return Reference({"messages": messages[:last], **({"tools": tools} if tools else {})}, text, calls, tools or [])


def _tries_to_call(text: str, style: Style) -> bool:
    """Whether a reply that parse_reply read as plain text was meant as a call (its markup is there)."""
    if style == "hermes":
        return CALL_OPEN in text
    return text.lstrip().startswith("<|python_tag|>") or re.match(r'\s*\{\s*"name"\s*:', text) is not None


def scored_calls(text: str, style: Style) -> tuple[list[dict] | None, list[dict] | None]:
    """(calls as parsed, calls as scored) of a reply. They differ when the reply tries to call but the call does
    not parse: it is then scored as one call that matches nothing and is never valid, so a broken call counts
    neither as the right call nor as 'no call'."""
    calls = parse_reply(text, style)[1]
    if calls is None and _tries_to_call(text, style):
        return None, [{"type": "function", "function": {"name": "", "arguments": text}}]
    return calls, calls


def _replies(model, tokenizer, refs: list[Reference], *, params: SamplingParams, chat_template: str | None,
             chat_template_kwargs: dict | None, batch_size: int, progress) -> list[tuple[str, str | None]]:
    """The model's reply to each reference's request, greedy unless `params` sample; tools in the prompt. Each
    is (answer, reasoning): a thinking template's reply is scored by its answer, after the think block."""
    return [(out.answer, out.reasoning_content)
            for out in generate_batch(model, tokenizer, [ref.request for ref in refs], params=params,
                                      chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
                                      batch_size=batch_size, progress=progress)]


def _inference(fn):
    """torch.inference_mode() as a decorator, with torch imported on first call (`import tunesmith` stays light)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)
    return wrapper


@_inference
def learnable_loss(model, tokenizer, records, *, chat_template=None, max_length=512, batch_size=8,
                   desc: str = "loss", chat_template_kwargs: dict | None = None, reasoning: Policy = "auto") -> float:
    """Mean cross-entropy over learnable tokens only (the same mask as training), summed across the set."""
    import torch

    examples, _ = tokenize_records(tokenizer, records, max_length=max_length, chat_template=chat_template,
                                   source="eval", generation_config=getattr(model, "generation_config", None),
                                   chat_template_kwargs=chat_template_kwargs, reasoning=reasoning)
    feats = [e.features() for e in examples]
    total, count = 0.0, 0
    device = device_of(model)
    with Progress(desc, len(feats)) as progress:
        for chunk, ids, mask in batches(feats, batch_size, tokenizer.pad_token_id, device=device, progress=progress):
            labels, _ = pad([f["labels"] for f in chunk], IGNORE_INDEX, width=ids.shape[1], device=device)
            # Prompt tuning prepends virtual tokens to the logits; the last seq positions are the real tokens.
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:-1]  # (batch, seq-1, vocab)
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            total += loss.item()
            count += int((target != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate_generation(model, tokenizer, records, *, chat_template=None, max_length=512, max_new_tokens=64,
                        params: SamplingParams | None = None, normalize: bool = False, batch_size=16,
                        desc: str = "scoring", chat_template_kwargs: dict | None = None,
                        reasoning: Policy = "auto") -> Evaluation:
    """Generate a reply for each record's prompt (greedy unless `params` sample) and compare with its gold
    reply; the loss is over the gold reply's learnable tokens, with the training mask (`chat_template_kwargs`
    and the `reasoning` policy as in training).

    In a conversation with tools the prompt carries the definitions and the reply's calls are parsed as the
    template prints them (data/tools.py); exact_match is then tools-aware (metrics.reply_matches) and the tool
    metrics (metrics.tool_metrics, over those records only) are added. Each prediction then shows `calls` (as
    parsed, None for none) beside `gold_calls`. A thinking template's reply is scored by its answer, and its
    prediction shows the reasoning apart (`reasoning`, when there was some)."""
    params = params or SamplingParams(max_new_tokens=max_new_tokens)
    refs = [split_reference(r) for r in records]
    with Progress(f"{desc}: generating", len(refs)) as progress:
        replies = _replies(model, tokenizer, refs, params=params, chat_template=chat_template,
                           chat_template_kwargs=chat_template_kwargs, batch_size=batch_size, progress=progress)
    texts = [answer for answer, _ in replies]
    with_tools = [i for i, r in enumerate(refs) if r.tools is not None]
    parsed, scored = [None] * len(refs), [None] * len(refs)
    if with_tools:  # calls are read back the way this template prints them
        style = call_style(chat_template_for(tokenizer, chat_template))
        for i in with_tools:
            parsed[i], scored[i] = scored_calls(texts[i], style)
    correct = [reply_matches(t, s, r.text, r.calls, normalized=normalize) for r, t, s in zip(refs, texts, scored)]
    predictions = [{"input": r.request, "gold": r.text, "prediction": t, "correct": c,
                    **({"reasoning": thought} if thought is not None else {}),
                    **({"gold_calls": r.calls, "calls": p} if r.tools is not None else {})}
                   for r, (t, thought), p, c in zip(refs, replies, parsed, correct)]
    loss = learnable_loss(model, tokenizer, records, chat_template=chat_template, max_length=max_length,
                          desc=f"{desc}: loss", chat_template_kwargs=chat_template_kwargs, reasoning=reasoning)
    metrics = {**generation_metrics(texts, [r.text for r in refs], normalized=normalize),
               "exact_match": sum(correct) / max(len(correct), 1), "loss": loss, "perplexity": math.exp(min(loss, 50))}
    if with_tools:
        metrics.update(tool_metrics([scored[i] for i in with_tools], [refs[i].calls for i in with_tools],
                                    [refs[i].tools for i in with_tools], details=True))
    return Evaluation(metrics, predictions)


def evaluate_classification(model, tokenizer, records, labels, *, max_length=512, batch_size=32,
                            desc: str = "scoring") -> Evaluation:
    features = encode_texts(tokenizer, [r["text"] for r in records], max_length)
    with Progress(desc, len(features)) as progress:
        found = label_texts(model, features, labels, tokenizer.pad_token_id, batch_size=batch_size,
                            progress=progress)
    names = [p.label for p in found]
    golds = [r["label"] for r in records]
    predictions = [{"input": r["text"], "gold": g, "prediction": p, "correct": g == p}
                   for r, g, p in zip(records, golds, names)]
    return Evaluation(classification_metrics(golds, names, labels, details=True), predictions)


def evaluate_tagging(model, tokenizer, records, labels, *, max_length=512, batch_size=32,
                     desc: str = "scoring") -> Evaluation:
    features = encode_words(tokenizer, [r["tokens"] for r in records], max_length)
    with Progress(desc, len(features)) as progress:
        found = label_words(model, features, labels, tokenizer.pad_token_id, batch_size=batch_size,
                            progress=progress)
    predictions = [{"input": " ".join(r["tokens"]), "gold": r["tags"], "prediction": words.labels,
                    "correct": words.labels == r["tags"]} for r, words in zip(records, found)]
    return Evaluation(ner_metrics([r["tags"] for r in records], [p["prediction"] for p in predictions],
                                  details=True), predictions)

"""POST /classify: labels and scores from runs trained with a head, in vLLM's shape.

A `classify` run answers vLLM's classification items `{"index", "label", "probs", "num_classes"}`. A `ner` run
answers one item per input text with its whitespace-separated words, a label and a score per word (the label
of the word's first sub-token, as in training and `tunesmith evaluate`), and the entities those IOB labels
spell, grouped as seqeval groups them for the metrics and shaped like transformers' token-classification
pipeline (`entity_group`, `score`, `word`, `start`, `end`; offsets in the input text). Inputs longer than the
model's context are cut on the right, as in training; the usage counts the tokens that were read. The labelling
itself is heads.py's, the path `tunesmith eval` scores with: a text gets the same label from both."""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import APIError
from .common import read

router = APIRouter()
HEADS = ("classify", "ner")
BATCH = 16  # texts per forward pass


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    input: str | Annotated[list[str], Field(min_length=1)]
    user: str | None = None  # accepted and ignored, as by the other routes


@dataclass
class Head:
    """What labelling with a served run needs besides its module."""

    labels: list[str]  # by class id
    tokenizer: object
    max_length: int | None
    # A fast tokenizer called with truncation sets it on its Rust object first; two threads doing that at once
    # fail with "Already borrowed" (a known tokenizers limitation), so calls are taken one at a time.
    lock: threading.Lock = field(default_factory=threading.Lock)


def head_of(entry, fallback_tokenizer) -> Head:
    """The label names (the model config's id2label, set from run.json at load), the run's own tokenizer (a
    head may sit on another base than the one that generates) and the context the model can read."""
    from ...models import load_tokenizer

    config = entry.module.config
    tokenizer = load_tokenizer(entry.run) if entry.run else fallback_tokenizer
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [n for n in limits if n and n < 1_000_000]  # tokenizers without a limit report ~1e30
    return Head([config.id2label[i] for i in range(config.num_labels)], tokenizer, min(limits, default=None))


def classify_texts(model, head: Head, texts: list[str]) -> tuple[list[dict], int]:
    """vLLM's classification items for `texts`, and the number of tokens read."""
    from ...heads import encode_texts, label_texts

    with head.lock:
        features = encode_texts(head.tokenizer, texts, head.max_length)
    _refuse_empty([len(f["input_ids"]) for f in features], "has no tokens")
    found = label_texts(model, features, head.labels, head.tokenizer.pad_token_id, batch_size=BATCH)
    items = [{"index": i, "label": p.label, "probs": p.probs, "num_classes": len(p.probs)} for i, p in enumerate(found)]
    return items, sum(len(f["input_ids"]) for f in features)


def tag_texts(model, head: Head, texts: list[str]) -> tuple[list[dict], int]:
    """Per-word labels, scores and entities for `texts` (words: runs of non-space), and the number of tokens read."""
    from seqeval.metrics.sequence_labeling import get_entities

    from ...heads import encode_words, label_words

    spans = [[m.span() for m in re.finditer(r"\S+", t)] for t in texts]  # (start, end) of each word
    _refuse_empty([len(s) for s in spans], "has no words")
    words = [[t[a:b] for a, b in s] for t, s in zip(texts, spans)]
    with head.lock:
        features = encode_words(head.tokenizer, words, head.max_length)
    found = label_words(model, features, head.labels, head.tokenizer.pad_token_id, batch_size=BATCH)
    items = []
    for i, (text, span, tagged) in enumerate(zip(texts, spans, found)):
        entities = [{"entity_group": kind, "score": sum(tagged.scores[a:b + 1]) / (b + 1 - a),
                     "word": text[span[a][0]:span[b][1]], "start": span[a][0], "end": span[b][1]}
                    for kind, a, b in get_entities(tagged.labels)]  # words a..b inclusive, never cut-off ones
        items.append({"index": i, "words": words[i], "labels": tagged.labels, "scores": tagged.scores,
                      "entities": entities, "num_classes": len(head.labels)})
    return items, sum(len(f["input_ids"]) for f in features)


def _refuse_empty(sizes: list[int], what: str) -> None:
    if (empty := next((i for i, n in enumerate(sizes) if n == 0), None)) is not None:
        raise APIError(400, f"input {empty} {what}: send some text to label.", param="input")


def _head(request: Request, name: str, entry) -> Head:
    """The cached Head of `entry` (per app and name; rebuilt when a reload put another entry under the name)."""
    state = request.app.state
    heads = getattr(state, "heads", None)
    if heads is None:
        heads = state.heads = {}
    cached = heads.get(name)
    if cached is None or cached[0] is not entry:
        cached = heads[name] = (entry, head_of(entry, request.app.state.engine.tokenizer))
    return cached[1]


@router.post("/classify")
async def classify(request: Request):
    body = await read(request, ClassifyRequest)
    entry = request.app.state.engine.models.get(body.model)  # held to the end: an unload cannot pull it away
    if entry is None:
        raise APIError(404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found")
    if entry.task not in HEADS:
        raise APIError(400, f"`{body.model}` generates text and has no trained head: /classify serves runs "
                       "trained with task classify or ner.", param="model", code="model_not_classifier")
    texts = [body.input] if isinstance(body.input, str) else body.input
    predict = classify_texts if entry.task == "classify" else tag_texts

    def work():
        return predict(entry.module, _head(request, body.model, entry), texts)

    items, tokens = await run_in_threadpool(work)
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": body.model, "data": items,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

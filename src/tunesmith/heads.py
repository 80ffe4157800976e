"""Labelling with a trained head (a `classify` or `ner` run): the one path that both `tunesmith eval`
(evaluation/scorers.py) and the server's /classify (serve/routes/classify.py) take, so a text gets the same
label, with the same probabilities, from either.

Texts and words are encoded as training encodes them (data/tokenize.py), then run in right-padded batches. A
classifier gives each text its probabilities over the head's labels; a tagger gives each word the label read on
its first sub-token, and a word cut off by truncation is "O" with no score. A label is the argmax of the
logits."""

from __future__ import annotations

from dataclasses import dataclass

from .batching import batches, device_of
from .data.tokenize import IGNORE_INDEX, encode_classification, encode_tagging


@dataclass
class TextLabel:
    label: str
    probs: list[float]  # over the head's labels, by class id


@dataclass
class WordLabels:
    labels: list[str]  # one per word
    scores: list[float | None]  # the probability of each word's label; None for a word cut off by truncation


def encode_texts(tokenizer, texts: list[str], max_length: int | None) -> list[dict]:
    """Each text's input ids, cut to `max_length` tokens (None: not cut), as training encodes them."""
    return encode_classification(tokenizer, [{"text": text} for text in texts], None, max_length)


def encode_words(tokenizer, words: list[list[str]], max_length: int | None) -> list[dict]:
    """Each word list's input ids as training encodes them (the words joined by single spaces, cut to
    `max_length` tokens), `labels` marking each word's first sub-token (IGNORE_INDEX elsewhere), and `words`,
    how many words there are."""
    records = [{"tokens": w, "tags": ["O"] * len(w)} for w in words]
    return [{**f, "words": len(w)} for f, w in zip(encode_tagging(tokenizer, records, {"O": 0}, max_length), words)]


def label_texts(model, features: list[dict], labels: list[str], pad_id: int, *, batch_size: int = 32,
                progress=None) -> list[TextLabel]:
    """The label and probabilities of each text encoded by `encode_texts`."""
    out = []
    for _, probs, best in _forward(model, features, pad_id, batch_size, progress):  # probs [B, K], best [B]
        out += [TextLabel(labels[b], p) for b, p in zip(best.tolist(), probs.tolist())]
    return out


def label_words(model, features: list[dict], labels: list[str], pad_id: int, *, batch_size: int = 32,
                progress=None) -> list[WordLabels]:
    """The label and its probability of each word of each word list encoded by `encode_words`."""
    out = []
    for chunk, probs, best in _forward(model, features, pad_id, batch_size, progress):  # [B, T, K], [B, T]
        for f, p, b in zip(chunk, probs, best):
            first = [t for t, mark in enumerate(f["labels"]) if mark != IGNORE_INDEX]  # a word's first sub-token
            picked = b[first]
            cut = f["words"] - len(first)  # words past the context
            out.append(WordLabels([labels[c] for c in picked.tolist()] + ["O"] * cut,
                                  p[first, picked].tolist() + [None] * cut))
    return out


def _forward(model, features: list[dict], pad_id: int, batch_size: int, progress):
    """(features, softmax, argmax) of the head's logits, on the CPU, for each batch of `features`."""
    import torch

    for chunk, ids, mask in batches(features, batch_size, pad_id, device=device_of(model), progress=progress):
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            probs, best = logits.softmax(-1).cpu(), logits.argmax(-1).cpu()
        yield chunk, probs, best

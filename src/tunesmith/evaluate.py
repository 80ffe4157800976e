"""Scoring a model on held-out records: generation (exact match, loss on learnable tokens), sequence
classification (accuracy, P/R/F1 via scikit-learn) and token classification (entity-level P/R/F1 via
seqeval). Used by `train` for its before/after scores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .data.tokenize import IGNORE_INDEX, encode_classification, encode_tagging, tokenize_records
from .generate import SamplingParams, generate_batch


@dataclass
class Evaluation:
    metrics: dict
    predictions: list[dict] = field(default_factory=list, repr=False)  # input, gold, prediction, correct


def split_reference(record: dict) -> tuple[dict, str]:
    """(generation request, gold reply) for an sft record: the last assistant turn, or the completion."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return {"messages": messages[:last]}, messages[last]["content"]
    return {"prompt": record["prompt"]}, record["completion"]


def exact_match(prediction: str, gold: str) -> bool:
    """Equal after stripping surrounding whitespace (a leading space is a tokenization artefact)."""
    return prediction.strip() == gold.strip()


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out = {"accuracy": float(accuracy_score(gold, predicted))}
    for average in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(gold, predicted, labels=labels, average=average, zero_division=0)
        out.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    return out


def ner_metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {"precision": float(precision_score(gold, predicted, zero_division=0)),
            "recall": float(recall_score(gold, predicted, zero_division=0)),
            "f1": float(f1_score(gold, predicted, zero_division=0))}


def _batches(features: list[dict], size: int, pad_id: int):
    for start in range(0, len(features), size):
        chunk = features[start:start + size]
        width = max(len(f["input_ids"]) for f in chunk)
        ids = torch.tensor([f["input_ids"] + [pad_id] * (width - len(f["input_ids"])) for f in chunk])
        mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in chunk])
        yield chunk, ids, mask


@torch.inference_mode()
def learnable_loss(model, tokenizer, records, *, chat_template=None, max_length=512, batch_size=8) -> float:
    """Mean cross-entropy over learnable tokens only (the same mask as training), summed across the set."""
    examples, _ = tokenize_records(tokenizer, records, max_length=max_length, chat_template=chat_template,
                                   source="eval")
    feats = [e.features() for e in examples]
    total, count = 0.0, 0
    for chunk, ids, mask in _batches(feats, batch_size, tokenizer.pad_token_id):
        labels = torch.tensor([f["labels"] + [IGNORE_INDEX] * (ids.shape[1] - len(f["labels"])) for f in chunk])
        # Prompt tuning prepends virtual tokens to the logits; the last seq positions are the real tokens.
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:-1]  # (batch, seq-1, vocab)
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        total += loss.item()
        count += int((target != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate_generation(model, tokenizer, records, *, chat_template=None, max_length=512, max_new_tokens=64,
                        batch_size=16) -> Evaluation:
    requests, golds = zip(*(split_reference(r) for r in records)) if records else ((), ())
    outputs = generate_batch(model, tokenizer, list(requests), params=SamplingParams(max_new_tokens=max_new_tokens),
                             chat_template=chat_template, batch_size=batch_size)
    predictions = [{"input": req, "gold": gold, "prediction": out.text, "correct": exact_match(out.text, gold)}
                   for req, gold, out in zip(requests, golds, outputs)]
    loss = learnable_loss(model, tokenizer, records, chat_template=chat_template, max_length=max_length)
    metrics = {"exact_match": sum(p["correct"] for p in predictions) / max(len(predictions), 1),
               "loss": loss, "perplexity": math.exp(min(loss, 50))}
    return Evaluation(metrics, predictions)


@torch.inference_mode()
def evaluate_classification(model, tokenizer, records, labels, *, max_length=512, batch_size=32) -> Evaluation:
    label2id = {label: i for i, label in enumerate(labels)}
    feats = encode_classification(tokenizer, records, label2id, max_length)
    predicted = []
    for _, ids, mask in _batches(feats, batch_size, tokenizer.pad_token_id):
        predicted += model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
    names = [labels[i] for i in predicted]
    golds = [r["label"] for r in records]
    predictions = [{"input": r["text"], "gold": g, "prediction": p, "correct": g == p}
                   for r, g, p in zip(records, golds, names)]
    return Evaluation(classification_metrics(golds, names, labels), predictions)


@torch.inference_mode()
def evaluate_tagging(model, tokenizer, records, labels, *, max_length=512, batch_size=32) -> Evaluation:
    label2id = {label: i for i, label in enumerate(labels)}
    feats = encode_tagging(tokenizer, records, label2id, max_length)
    golds, preds, predictions = [], [], []
    for chunk, ids, mask in _batches(feats, batch_size, tokenizer.pad_token_id):
        argmax = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
        for f, row in zip(chunk, argmax):
            words = [labels[p] for p, gold in zip(row, f["labels"]) if gold != IGNORE_INDEX]
            preds.append(words)
    for record, words in zip(records, preds):
        words = words + ["O"] * (len(record["tags"]) - len(words))  # words cut by truncation count as O
        golds.append(record["tags"])
        predictions.append({"input": " ".join(record["tokens"]), "gold": record["tags"], "prediction": words,
                            "correct": words == record["tags"]})
    return Evaluation(ner_metrics(golds, [p["prediction"] for p in predictions]), predictions)


def evaluate_records(model, tokenizer, records, task: str, *, labels=None, chat_template=None, max_length=512,
                     max_new_tokens=64) -> Evaluation:
    """Score `model` on `records` for `task` (sft, classify or ner)."""
    was_training = model.training
    model.eval()
    try:
        if task == "sft":
            return evaluate_generation(model, tokenizer, records, chat_template=chat_template, max_length=max_length,
                                       max_new_tokens=max_new_tokens)
        if task == "classify":
            return evaluate_classification(model, tokenizer, records, labels, max_length=max_length)
        return evaluate_tagging(model, tokenizer, records, labels, max_length=max_length)
    finally:
        model.train(was_training)

"""The scorers of a model on held-out records, one per kind of output: generation (exact match, BLEU, ROUGE-L,
and the loss on the learnable tokens only), sequence classification (accuracy, P/R/F1, per-class report,
confusion matrix) and token classification (entity-level P/R/F1 per type), the last two labelling through
heads.py as the server's /classify does. Which one scores a model is decided in one place, `score` (choose.py);
the metric functions live in metrics.py."""

from __future__ import annotations

import functools
import math

from ..batching import batches, device_of, pad
from ..data.tokenize import IGNORE_INDEX, tokenize_records
from ..generation import SamplingParams, generate_batch
from ..heads import encode_texts, encode_words, label_texts, label_words
from ..metrics import classification_metrics, exact_match, generation_metrics, ner_metrics
from ..progress import Progress
from .results import Evaluation


def split_reference(record: dict) -> tuple[dict, str]:
    """(generation request, gold reply) for an sft record: the last assistant turn, or the completion."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return {"messages": messages[:last]}, messages[last]["content"]
    return {"prompt": record["prompt"]}, record["completion"]


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
                   desc: str = "loss") -> float:
    """Mean cross-entropy over learnable tokens only (the same mask as training), summed across the set."""
    import torch

    examples, _ = tokenize_records(tokenizer, records, max_length=max_length, chat_template=chat_template,
                                   source="eval", generation_config=getattr(model, "generation_config", None))
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
                        desc: str = "scoring") -> Evaluation:
    """Generate a reply for each record's prompt (greedy unless `params` sample) and compare with its gold
    reply; the loss is over the gold reply's learnable tokens, with the training mask."""
    params = params or SamplingParams(max_new_tokens=max_new_tokens)
    requests, golds = zip(*(split_reference(r) for r in records)) if records else ((), ())
    with Progress(f"{desc}: generating", len(requests)) as progress:
        outputs = generate_batch(model, tokenizer, list(requests), params=params, chat_template=chat_template,
                                 batch_size=batch_size, progress=progress)
    texts = [out.text for out in outputs]
    predictions = [{"input": req, "gold": gold, "prediction": text,
                    "correct": exact_match(text, gold, normalized=normalize)}
                   for req, gold, text in zip(requests, golds, texts)]
    loss = learnable_loss(model, tokenizer, records, chat_template=chat_template, max_length=max_length,
                          desc=f"{desc}: loss")
    metrics = {**generation_metrics(texts, list(golds), normalized=normalize),
               "loss": loss, "perplexity": math.exp(min(loss, 50))}
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

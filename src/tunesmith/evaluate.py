"""Scoring a model on held-out records: generation (exact match, BLEU, ROUGE-L, loss on the learnable tokens
only), sequence classification (accuracy, P/R/F1, per-class report, confusion matrix) and token
classification (entity-level P/R/F1 per type). `evaluate()` is the public entry point (`tunesmith eval`);
`train` uses `evaluate_records` for its before/after scores. The metric functions live in metrics.py."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .batching import batches, device_of, pad
from .data.tokenize import IGNORE_INDEX, encode_classification, encode_tagging, tokenize_records
from .errors import TunesmithError
from .generate import SamplingParams, generate_batch
from .metrics import classification_metrics, exact_match, generation_metrics, ner_metrics
from .progress import Progress


class EvaluateError(TunesmithError, ValueError):
    """Data or a model that cannot be scored as asked; the message says what to change."""


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


@_inference
def evaluate_classification(model, tokenizer, records, labels, *, max_length=512, batch_size=32,
                            desc: str = "scoring") -> Evaluation:
    label2id = {label: i for i, label in enumerate(labels)}
    feats = encode_classification(tokenizer, records, label2id, max_length)
    predicted = []
    with Progress(desc, len(feats)) as progress:
        for _, ids, mask in batches(feats, batch_size, tokenizer.pad_token_id, device=device_of(model),
                                    progress=progress):
            predicted += model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
    names = [labels[i] for i in predicted]
    golds = [r["label"] for r in records]
    predictions = [{"input": r["text"], "gold": g, "prediction": p, "correct": g == p}
                   for r, g, p in zip(records, golds, names)]
    return Evaluation(classification_metrics(golds, names, labels, details=True), predictions)


@_inference
def evaluate_tagging(model, tokenizer, records, labels, *, max_length=512, batch_size=32,
                     desc: str = "scoring") -> Evaluation:
    label2id = {label: i for i, label in enumerate(labels)}
    feats = encode_tagging(tokenizer, records, label2id, max_length)
    golds, preds, predictions = [], [], []
    with Progress(desc, len(feats)) as progress:
        for chunk, ids, mask in batches(feats, batch_size, tokenizer.pad_token_id, device=device_of(model),
                                        progress=progress):
            argmax = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
            for f, row in zip(chunk, argmax):
                words = [labels[p] for p, gold in zip(row, f["labels"]) if gold != IGNORE_INDEX]
                preds.append(words)
    for record, words in zip(records, preds):
        words = words + ["O"] * (len(record["tags"]) - len(words))  # words cut by truncation count as O
        golds.append(record["tags"])
        predictions.append({"input": " ".join(record["tokens"]), "gold": record["tags"], "prediction": words,
                            "correct": words == record["tags"]})
    return Evaluation(ner_metrics(golds, [p["prediction"] for p in predictions], details=True), predictions)


def evaluate_records(model, tokenizer, records, task: str, *, labels=None, chat_template=None, max_length=512,
                     max_new_tokens=64, params: SamplingParams | None = None, normalize: bool = False,
                     desc: str = "scoring") -> Evaluation:
    """Score `model` on `records` for `task` (sft, classify or ner); progress is shown as `desc`."""
    was_training = model.training
    model.eval()
    try:
        if task == "sft":
            return evaluate_generation(model, tokenizer, records, chat_template=chat_template, max_length=max_length,
                                       max_new_tokens=max_new_tokens, params=params, normalize=normalize, desc=desc)
        if task == "classify":
            return evaluate_classification(model, tokenizer, records, labels, max_length=max_length, desc=desc)
        return evaluate_tagging(model, tokenizer, records, labels, max_length=max_length, desc=desc)
    finally:
        model.train(was_training)


def write_results(result: Evaluation, directory: str | Path) -> Path:
    """metrics.json and predictions.jsonl (input, gold, prediction, correct per line) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(result.metrics, indent=2), encoding="utf-8")
    with (directory / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for p in result.predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return directory


_TASK_OF_KIND = {"chat": "sft", "completion": "sft", "classification": "classify", "tagging": "ner"}


def evaluate(model: str | tuple, data: str | Path | list[dict], *, task: str | None = None,
             labels: list[str] | None = None, prompting=None, train_data: str | Path | list[dict] | None = None,
             output_dir: str | Path | None = None, limit: int | None = None, chat_template: str | None = None,
             max_length: int = 512, params: SamplingParams | None = None, normalize: bool = False,
             seed: int = 0, device: str | None = None) -> Evaluation:
    """Score a model on held-out data, in one call.

    `model` is an embedded name, a directory, a hub id, a tunesmith run directory, or a (model, tokenizer)
    pair. The task is the run's, else guessed from the records (chat/completion -> sft, text+label ->
    classify, tokens+tags -> ner). A classify task on a plain causal LM (no trained head) is scored through
    the language model with `prompting` (a PromptingConfig or a mapping; default: zero-shot, label names as
    label words); `train_data` supplies its k-shot exemplars. With `output_dir`, writes metrics.json and
    predictions.jsonl there. `device` (auto, cpu, cuda) moves the model there first; None leaves it where it is."""
    from .config import PromptingConfig, load_prompting
    from .data.formats import kind_of, read_records
    from .models import load_causal_lm, load_run, load_tokenizer, run_info

    records = list(data) if isinstance(data, list) else read_records(data)
    if not records:
        raise EvaluateError(f"{data}: no records to evaluate")
    records = records[:limit] if limit else records
    info = run_info(model) if isinstance(model, (str, Path)) else None
    task = task or (info or {}).get("task") or _TASK_OF_KIND[kind_of(records[0])]
    pool = (list(train_data) if isinstance(train_data, list) else read_records(train_data)) if train_data else []
    if isinstance(prompting, dict):
        prompting = load_prompting(prompting)
    if prompting is not None and prompting.shots > len(pool):
        raise EvaluateError(f"{prompting.shots}-shot prompting needs at least {prompting.shots} exemplars from "
                            f"the training data, but {'it has ' + str(len(pool)) if train_data else 'none was given'}"
                            " (give train_data, or --train-data on the command line)")
    labels = labels or (info or {}).get("labels")
    if task == "classify" and not labels:
        labels = sorted({r["label"] for r in records} | {r["label"] for r in pool})
    if task == "ner" and not labels:
        raise EvaluateError("ner needs the tag list of a trained model: evaluate a tunesmith run")
    if info:
        lm, tokenizer, _ = load_run(model)
    elif isinstance(model, tuple):
        lm, tokenizer = model
    elif task == "classify" and prompting is None and not _is_causal_lm(model):
        raise EvaluateError(f"{model} is not a trained classifier; evaluate a tunesmith run, or a causal LM with "
                         "prompting")
    else:
        lm, tokenizer = load_causal_lm(model), load_tokenizer(model)
    if device is not None:
        from .generation.device import place

        lm = place(lm, device)
    needs_prompting = task == "classify" and (prompting is not None or not info and not isinstance(model, tuple))
    if needs_prompting or (task == "sft" and prompting is not None):
        from .prompting import classify_by_prompting, generate_by_prompting

        prompting = prompting or PromptingConfig()
        if task == "classify":
            result = classify_by_prompting(lm, tokenizer, records, labels, prompting, pool=pool, seed=seed,
                                           chat_template=chat_template)
        else:
            result = generate_by_prompting(lm, tokenizer, records, prompting, pool=pool, seed=seed,
                                           chat_template=chat_template, max_length=max_length, params=params,
                                           normalize=normalize)
    else:
        result = evaluate_records(lm, tokenizer, records, task, labels=labels, chat_template=chat_template,
                                  max_length=max_length, params=params, normalize=normalize)
    result.metrics = {"task": task, "examples": len(records), **result.metrics}
    if output_dir:
        write_results(result, output_dir)
    return result


def _is_causal_lm(name) -> bool:
    """Whether a model's config names a causal-LM architecture (an encoder such as MiniLM is not one)."""
    from transformers import AutoConfig

    from .models import resolve

    config = AutoConfig.from_pretrained(resolve(str(name)))
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))

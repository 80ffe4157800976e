"""Metric functions on plain lists of strings: no models here. Classification through scikit-learn, entities
through seqeval, BLEU through sacrebleu and ROUGE-L through rouge-score, so the numbers match what those
tools report on their own; tool calls (OpenAI's call objects, as parsed from replies) against their gold calls,
arguments checked against the function's JSON schema with jsonschema. Which of them headline each task is here
too (MAIN_METRICS)."""

from __future__ import annotations

import json
import re
import string
from collections import defaultdict

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")

# The headline metrics of each task, its main one first: the columns and plot of a comparison, the score of each
# task in `tunesmith continual`, and what training keeps its best checkpoint by (classify, ner). sft data with
# tools keeps "exact_match" as its main metric, made tools-aware (`reply_matches`): a record whose gold reply is a
# call turn counts as matched when its calls do (call exact match), a plain reply when its text does and it makes
# no call; so one number, comparable across tool and plain data, still judges every sft run.
# A preference run is judged by how often it prefers the chosen reply of held-out pairs (evaluation/preference.py),
# then by what it kept of the sft task it continues (scored on that run's eval split after preference tuning).
MAIN_METRICS = {"classify": ["accuracy", "macro_f1"], "ner": ["f1"], "sft": ["exact_match", "rouge_l"],
                "preference": ["preference_accuracy", "exact_match"]}


def main_metric(task: str) -> str:
    """The one number a task is judged by: exact_match (sft), accuracy (classify), f1 (ner), preference_accuracy
    (preference)."""
    return MAIN_METRICS[task][0]


def normalize(text: str) -> str:
    """Lowercase, drop ASCII punctuation and collapse whitespace (the SQuAD-style answer normalisation,
    without its English-only article removal)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, gold: str, *, normalized: bool = False) -> bool:
    """Equal after stripping surrounding whitespace (a leading space is a tokenization artefact), or after
    `normalize` when `normalized`."""
    if normalized:
        return normalize(prediction) == normalize(gold)
    return prediction.strip() == gold.strip()


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenizer, exp smoothing): `sacrebleu REF < HYP`."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (0-1) over pairs, rouge-score's default tokenizer, no stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / max(len(scores), 1)


def generation_metrics(predictions: list[str], references: list[str], *, normalized: bool = False) -> dict:
    matches = [exact_match(p, r, normalized=normalized) for p, r in zip(predictions, references)]
    return {"exact_match": sum(matches) / max(len(matches), 1),
            "bleu": bleu([p.strip() for p in predictions], [r.strip() for r in references]),
            "rouge_l": rouge_l(predictions, references)}


# ---------------------------------------------------------------------------------------------------------
# Tool calls. A call is OpenAI's `{"function": {"name": ..., "arguments": "<JSON string>"}}` (id and type are
# ignored); a turn's calls are a list of them, or None for a plain reply. Arguments are an arbitrary string, as
# an API may return them: what does not parse as a JSON object matches nothing and is never valid.
# ---------------------------------------------------------------------------------------------------------

def _arguments(call: dict) -> dict | None:
    try:
        value = json.loads(call["function"]["arguments"])
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _same_json(a, b) -> bool:
    """Equal as JSON values: objects order-free, numbers by value (1 == 1.0), but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_json, a, b))
    return a == b


def _same_call(a: dict, b: dict) -> bool:
    args = _arguments(a)
    return (a["function"]["name"] == b["function"]["name"] and args is not None
            and _same_json(args, _arguments(b)))


def calls_match(predicted: list[dict] | None, gold: list[dict] | None) -> bool:
    """Call exact match: the same calls (function name and arguments, compared as parsed JSON objects), as many
    of each, in any order (parallel calls have none). No call on either side matches only no call."""
    if not predicted or not gold:
        return not predicted and not gold
    left = list(predicted)
    for call in gold:
        found = next((i for i, p in enumerate(left) if _same_call(p, call)), None)
        if found is None:
            return False
        left.pop(found)
    return not left


def arguments_valid(call: dict, tools: list[dict]) -> bool:
    """Whether a call names a function in `tools` (OpenAI's entries or bare function objects) and its arguments
    parse as a JSON object that validates against the function's `parameters` (any object when it has none;
    never against a schema that is not one)."""
    import jsonschema

    functions = {f.get("name"): f for f in (t["function"] if isinstance(t.get("function"), dict) else t
                                            for t in tools)}
    function, args = functions.get(call["function"]["name"]), _arguments(call)
    if function is None or args is None:
        return False
    schema = function.get("parameters") or {"type": "object"}
    try:
        validator = jsonschema.validators.validator_for(schema)
        validator.check_schema(schema)
        return validator(schema).is_valid(args)
    except jsonschema.SchemaError:
        return False


def reply_matches(text: str, calls: list[dict] | None, gold_text: str, gold_calls: list[dict] | None, *,
                  normalized: bool = False) -> bool:
    """The tools-aware exact match of one reply (MAIN_METRICS): a gold call turn by its calls, a gold plain
    reply by its text, with no call made."""
    if gold_calls:
        return calls_match(calls, gold_calls)
    return not calls and exact_match(text, gold_text, normalized=normalized)


def tool_metrics(predicted: list[list[dict] | None], gold: list[list[dict] | None], tools: list[list[dict]], *,
                 details: bool = False) -> dict:
    """Tool-call metrics over turns of conversations with tools, one entry per turn in each list (`tools`: the
    definitions offered in that turn's conversation). A rate whose denominator is empty is left out.

    - call_exact_match: of the turns whose gold reply is a call, those whose predicted calls match (calls_match)
    - arguments_valid: of all predicted calls, those whose arguments validate (arguments_valid)
    - no_call_accuracy: of the turns whose gold reply is plain text, those where the model made no call
    With `details`, `per_function` {name: {exact_match, support}}: call exact match over the gold call turns
    that call that function (a turn with parallel calls counts for each function it calls)."""
    hits = {"call_exact_match": [calls_match(p, g) for p, g in zip(predicted, gold) if g],
            "arguments_valid": [arguments_valid(c, t) for p, t in zip(predicted, tools) for c in p or []],
            "no_call_accuracy": [not p for p, g in zip(predicted, gold) if not g]}
    out = {name: sum(h) / len(h) for name, h in hits.items() if h}
    if details:
        by_function = defaultdict(list)
        for p, g in zip(predicted, gold):
            for name in dict.fromkeys(c["function"]["name"] for c in g or []):
                by_function[name].append(calls_match(p, g))
        out["per_function"] = {name: {"exact_match": sum(h) / len(h), "support": len(h)}
                               for name, h in sorted(by_function.items())}
    return out


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str], *,
                           details: bool = False) -> dict:
    """Accuracy and macro/micro P/R/F1 (scalars; what training logs). With `details`, also `per_class`
    ({label: precision, recall, f1, support}) and `confusion_matrix` (rows gold, columns predicted, in
    `labels` order)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    out = {"accuracy": float(accuracy_score(gold, predicted))}
    for average in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(gold, predicted, labels=labels, average=average, zero_division=0)
        out.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    if details:
        p, r, f, s = precision_recall_fscore_support(gold, predicted, labels=labels, average=None, zero_division=0)
        out["per_class"] = {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                    "support": int(s[i])} for i, label in enumerate(labels)}
        out["confusion_matrix"] = {"labels": list(labels),
                                   "matrix": confusion_matrix(gold, predicted, labels=labels).tolist()}
    return out


def ner_metrics(gold: list[list[str]], predicted: list[list[str]], *, details: bool = False) -> dict:
    """Entity-level micro P/R/F1 (seqeval, IOB2 default mode: an entity counts only if its type and exact
    span match). With `details`, `per_type` {type: precision, recall, f1, support}."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    out = {"precision": float(precision_score(gold, predicted, zero_division=0)),
           "recall": float(recall_score(gold, predicted, zero_division=0)),
           "f1": float(f1_score(gold, predicted, zero_division=0))}
    if details:
        report = classification_report(gold, predicted, output_dict=True, zero_division=0)
        out["per_type"] = {name: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                                  "f1": float(v["f1-score"]), "support": int(v["support"])}
                           for name, v in report.items() if not name.endswith(" avg")}
    return out


def scalars(metrics: dict) -> dict:
    """Only the numeric metrics (for tables and the before/after printout)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

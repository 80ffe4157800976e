"""Metric functions on plain lists of strings: no models here. Classification through scikit-learn, entities
through seqeval, BLEU through sacrebleu and ROUGE-L through rouge-score, so the numbers match what those
tools report on their own. Which of them headline each task is here too (MAIN_METRICS)."""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")

# The headline metrics of each task, its main one first: the columns and plot of a comparison, the score of each
# task in `tunesmith continual`, and what training keeps its best checkpoint by (classify, ner).
MAIN_METRICS = {"classify": ["accuracy", "macro_f1"], "ner": ["f1"], "sft": ["exact_match", "rouge_l"]}


def main_metric(task: str) -> str:
    """The one number a task is judged by: exact_match (sft), accuracy (classify), f1 (ner)."""
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

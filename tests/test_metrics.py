"""Metric functions against values computed by hand on small fixed inputs, and BLEU against sacrebleu's own
command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.metrics import (MAIN_METRICS, bleu, classification_metrics, exact_match, generation_metrics, main_metric,
                               ner_metrics, rouge_l)


def test_exact_match_strips_and_optionally_normalizes():
    assert exact_match(" Paris", "Paris\n") and not exact_match("paris.", "Paris")
    assert exact_match("  The  answer: PARIS!", "the answer paris", normalized=True)
    assert not exact_match("Paris, France", "Paris", normalized=True)


def test_classification_metrics_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    m = classification_metrics(gold, pred, ["a", "b", "c"], details=True)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2, R 2/3, F1 0.8 · b: P 1/2, R 1/2, F1 0.5 · c: P 1/2, R 1/1, F1 2/3
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # single-label micro averages all equal accuracy
    assert m["micro_precision"] == m["micro_recall"] == m["micro_f1"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == {"labels": ["a", "b", "c"], "matrix": [[2, 1, 0], [0, 1, 1], [0, 0, 1]]}
    assert "per_class" not in classification_metrics(gold, pred, ["a", "b", "c"])  # what training logs: scalars


def test_ner_metrics_count_only_exact_entity_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "I-ORG", "O", "B-LOC"]]
    # PER: span cut short (partial match -> wrong); LOC 1: right; ORG: right; LOC 2: typed as ORG (wrong);
    # plus a spurious MISC.
    pred = [["B-PER", "O", "O", "B-LOC", "B-MISC"], ["B-ORG", "I-ORG", "I-ORG", "O", "B-ORG"]]
    m = ner_metrics(gold, pred, details=True)
    # gold entities 4 (PER, LOC, ORG, LOC); predicted 5 (PER, LOC, MISC, ORG, ORG); correct 2
    assert m["precision"] == pytest.approx(2 / 5) and m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert m["per_type"]["PER"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert m["per_type"]["LOC"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_type"]["ORG"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["per_type"]["MISC"]["precision"] == 0.0 and m["per_type"]["MISC"]["support"] == 0


HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the dog", "hello there general kenobi"]
REFS = ["the cat sat on a mat", "the quick brown fox jumps over the lazy dog", "hello there general kenobi"]


def test_bleu_matches_the_sacrebleu_command_line(tmp_path):
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("\n".join(REFS) + "\n")
    hyp.write_text("\n".join(HYPS) + "\n")
    cli = Path(sys.executable).with_name("sacrebleu")
    out = subprocess.run([str(cli), str(ref), "-i", str(hyp), "-b", "-w", "4"], capture_output=True, text=True,
                         check=True).stdout
    assert bleu(HYPS, REFS) == pytest.approx(float(out.strip()), abs=1e-4)
    assert bleu(REFS, REFS) == pytest.approx(100.0)


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat sat on a mat") = "the cat sat on mat": 5 of 6 words each way
    assert rouge_l([HYPS[0]], [REFS[0]]) == pytest.approx(5 / 6)
    assert rouge_l(["a b c d"], ["a c"]) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    m = generation_metrics([" the cat sat on a mat", "x"], ["the cat sat on a mat", "y"])
    assert m["exact_match"] == 0.5 and m["rouge_l"] == pytest.approx(0.5)


def test_every_task_headlines_metrics_its_scorer_reports():
    """One definition of each task's main metric (comparison columns, continual's score, best checkpoint), for every
    task a config accepts, naming numbers the task's metric function really returns."""
    from typing import get_args

    from tunesmith.config import TrainConfig

    assert MAIN_METRICS.keys() == set(get_args(TrainConfig.model_fields["task"].annotation))
    from tunesmith.evaluation.preference import pair_metrics

    reported = {"sft": generation_metrics(["a b"], ["a b"]), "classify": classification_metrics(["x"], ["x"], ["x"]),
                "ner": ner_metrics([["B-X"]], [["B-X"]]),
                # a preference run continuing an sft run reports both (training/loop.py)
                "preference": {**pair_metrics([(-1.0, 2)], [(-3.0, 2)], None, None, measure="logprob", beta=1.0)[0],
                               **generation_metrics(["a b"], ["a b"])}}
    for task, names in MAIN_METRICS.items():
        assert set(names) <= reported[task].keys(), task
    assert [main_metric(t) for t in ("sft", "classify", "ner")] == ["exact_match", "accuracy", "f1"]

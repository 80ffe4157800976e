"""`evaluate()` and `tunesmith eval` on tiny random models: the files written, the metrics per task, batched
generation equal to one-at-a-time generation, seeded sampling, and errors as sentences."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main
from tunesmith.evaluation import EvaluateError, evaluate
from tunesmith.generation import SamplingParams, generate

CHAT = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(5)]
REVIEWS = [{"text": "great movie, loved it", "label": "positive"}, {"text": "boring", "label": "negative"},
           {"text": "it was fine", "label": "neutral"}]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generation_eval_writes_metrics_and_predictions(tiny_lm, chatml_tokenizer, tmp_path):
    params = SamplingParams(max_new_tokens=6)
    result = evaluate((tiny_lm, chatml_tokenizer), CHAT, output_dir=tmp_path, params=params)
    assert result.metrics.keys() == {"task", "examples", "exact_match", "bleu", "rouge_l", "loss", "perplexity"}
    assert result.metrics["task"] == "sft" and result.metrics["examples"] == 5
    predictions = lines(tmp_path / "predictions.jsonl")
    assert [p.keys() for p in predictions] == [{"input", "gold", "prediction", "correct"}] * 5
    assert predictions[2]["gold"] == "It is 4." and predictions[2]["input"] == {"messages": CHAT[2]["messages"][:1]}
    assert json.loads((tmp_path / "metrics.json").read_text()) == result.metrics
    # Batched (left-padded) greedy generation gives what generating each prompt alone gives.
    for p, record in zip(predictions, CHAT):
        alone = generate(tiny_lm, chatml_tokenizer, messages=record["messages"][:1], params=params)
        assert p["prediction"] == alone.text


def test_seeded_sampling_is_reproducible(tiny_lm, chatml_tokenizer):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    first = evaluate((tiny_lm, chatml_tokenizer), CHAT, params=params).predictions
    again = evaluate((tiny_lm, chatml_tokenizer), CHAT, params=params).predictions
    assert [p["prediction"] for p in first] == [p["prediction"] for p in again]


def test_cli_eval_classifies_through_the_language_model(model_dir, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in REVIEWS))
    prompting = tmp_path / "prompt.yaml"
    prompting.write_text("template: 'Review: {{ text }} Sentiment:'\nformat: completion\n")
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--prompting", str(prompting),
                 "--train-data", str(data), "--shots", "1", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro_f1" in out and f"written to {tmp_path / 'out'}" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["prompting"] == "1-shot" and metrics["confusion_matrix"]["labels"] == ["negative", "neutral",
                                                                                            "positive"]
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 3
    assert all(p.keys() == {"input", "gold", "prediction", "correct", "scores"}
               for p in lines(tmp_path / "out" / "predictions.jsonl"))


def test_eval_errors_are_sentences(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    data = tmp_path / "tags.jsonl"
    data.write_text(json.dumps({"tokens": ["Paris"], "tags": ["B-LOC"]}) + "\n")
    assert main(["eval", "--model", str(model_dir), "--data", str(data)]) == 1
    assert "ner needs the tag list of a trained model" in capsys.readouterr().err
    with pytest.raises(EvaluateError, match="no records"):
        evaluate(str(model_dir), [])


def test_train_scores_a_classifier_before_through_the_language_model(model_dir, tmp_path):
    from tunesmith.training import train

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in REVIEWS * 2))
    base = {"model": str(model_dir), "task": "classify", "max_steps": 1, "batch_size": 6, "save_steps": 100,
            "data": {"train": str(data), "eval": str(data)}}
    prompted = train({**base, "output_dir": str(tmp_path / "a"),
                      "prompting": {"template": "Review: {{ text }} Sentiment:", "format": "completion", "shots": 1}})
    assert prompted.metrics["before"]["before_kind"] == "1-shot prompting (verbalizer)"
    assert prompted.metrics["before"]["confusion_matrix"]["labels"] == ["negative", "neutral", "positive"]
    head = train({**base, "output_dir": str(tmp_path / "b")})
    assert head.metrics["before"]["before_kind"] == "untrained head"
    assert len(lines(head.path / "predictions.jsonl")) == 6

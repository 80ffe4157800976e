"""Prompting without training on a tiny random model: the label chosen is the arg-max of the label words'
log-likelihoods (single- and multi-token words, several words per label), calibration, and k-shot layouts."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config import PromptingConfig
from tunesmith.evaluation import EvaluateError
from tunesmith.evaluation.prompting import (classification_prompt, classify_by_prompting, label_scores, label_words,
                                 with_shots)

RECORDS = [{"text": t, "label": lab} for t, lab in [("great movie, loved it", "positive"), ("boring", "negative"),
                                                     ("it was fine", "neutral"), ("loved it", "positive")]]


def loglik(model, prompt: list[int], word: list[int]) -> float:
    """log P(word | prompt) by one plain forward pass over prompt + word (the reference computation)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + word])).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(word))


@pytest.mark.parametrize("fmt", ["completion", "chat"])
def test_chosen_label_is_the_argmax_of_label_word_log_likelihoods(tiny_lm, chatml_tokenizer, fmt):
    tok = chatml_tokenizer
    # " positive" / " negative" are single BPE tokens in the tiny vocabulary; the others split into several.
    verbalizer = {"positive": [" positive", " loved it"], "negative": " negative", "neutral": [" fine movie"]}
    cfg = PromptingConfig(template="Review: {{ text }} Sentiment:", format=fmt, verbalizer=verbalizer)
    labels = ["negative", "neutral", "positive"]
    words = label_words(cfg, labels)
    lengths = {w: len(tok(w, add_special_tokens=False)["input_ids"]) for ws in words.values() for w in ws}
    assert lengths[" positive"] == lengths[" negative"] == 1 and lengths[" fine movie"] > 1 < lengths[" loved it"]

    result = classify_by_prompting(tiny_lm, tok, RECORDS, labels, cfg, batch_size=3)
    for record, prediction in zip(RECORDS, result.predictions):
        prompt = classification_prompt(tok, record, cfg, labels, words, [])
        expected = {}
        for label in labels:
            ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words[label]]
            expected[label] = torch.logsumexp(torch.tensor([loglik(tiny_lm, prompt, w) for w in ids]), 0).item()
        assert prediction["scores"] == pytest.approx(expected, abs=1e-3)
        assert prediction["prediction"] == max(expected, key=expected.get)
    assert result.metrics["accuracy"] == sum(p["correct"] for p in result.predictions) / len(RECORDS)


def test_contextual_calibration_divides_by_the_content_free_distribution(tiny_lm, chatml_tokenizer):
    tok, labels = chatml_tokenizer, ["negative", "neutral", "positive"]
    plain = PromptingConfig(template="Review: {{ text }} Sentiment:", format="completion")
    calibrated = plain.model_copy(update={"calibrate": True, "calibration_inputs": ["N/A"]})
    words = label_words(plain, labels)
    raw = classify_by_prompting(tiny_lm, tok, RECORDS, labels, plain)
    cal = classify_by_prompting(tiny_lm, tok, RECORDS, labels, calibrated)
    free = classification_prompt(tok, {"text": "N/A", "label": "x"}, plain, labels, words, [])
    p_cf = torch.softmax(label_scores(tiny_lm, tok, [free], words)[0], 0)
    for r, c in zip(raw.predictions, cal.predictions):
        s = torch.tensor([r["scores"][label] for label in labels])
        expected = torch.log_softmax(s, 0) - torch.log(p_cf)
        assert torch.tensor([c["scores"][label] for label in labels]) == pytest.approx(expected, abs=1e-3)
        assert c["prediction"] == labels[int(expected.argmax())]
    assert cal.metrics["prompting"] == "0-shot calibrated"


def test_k_shot_prompts_show_each_shot_with_its_first_label_word(chatml_tokenizer):
    cfg = PromptingConfig(template="Review: {{ text }}\nSentiment:", instruction="Labels: {{ labels }}.",
                          format="completion", verbalizer={"positive": [" good", " great"]}, shots=2)
    labels = ["negative", "positive"]
    ids = classification_prompt(chatml_tokenizer, {"text": "meh"}, cfg, labels, label_words(cfg, labels),
                                RECORDS[:2])
    assert chatml_tokenizer.decode(ids) == ("Labels: negative, positive.\n\nReview: great movie, loved it\n"
                                            "Sentiment: good\n\nReview: boring\nSentiment: negative\n\n"
                                            "Review: meh\nSentiment:")
    with pytest.raises(EvaluateError, match="verbalizer names labels \\['postive'\\]"):
        label_words(PromptingConfig(verbalizer={"postive": "good"}), labels)


def test_with_shots_for_chat_and_completion_records():
    system = {"role": "system", "content": "Be brief."}
    shot = {"messages": [system, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    query = {"messages": [system, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    assert [m["content"] for m in with_shots(query, [shot])["messages"]] == ["Be brief.", "1+1?", "2", "2+2?", "4"]
    done = with_shots({"prompt": "Q: 2+2?\nA:", "completion": " 4"}, [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}])
    assert done == {"prompt": "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA:", "completion": " 4"}

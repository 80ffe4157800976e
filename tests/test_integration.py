"""The real embedded models, end to end (offline). Slower than the rest, so kept few."""

from __future__ import annotations

import time

import pytest

from tunesmith import generate, models
from tunesmith.cli import main
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_chat

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    model, tokenizer = models.load("smollm2-135m-instruct")
    print(f"smollm2 load: {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    out = generate(model, tokenizer, messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_smollm2_chat_mask_covers_reply_and_im_end(smollm2):
    _, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}]
    example = tokenize_chat(tokenizer, messages)
    learned = [label for label in example.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "The capital of France is Paris.<|im_end|>"


def test_cli_generate_streams_the_answer(smollm2, capsys):
    code = main(["generate", "--messages", '[{"role": "user", "content": "What is the capital of France?"}]',
                 "--max-new-tokens", "20"])
    assert code == 0 and "Paris" in capsys.readouterr().out


def test_minilm_encoder_loads():
    from transformers import AutoModel, AutoTokenizer

    path = models.resolve("minilm-l6")
    model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    out = model(**tokenizer("hello world", return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384

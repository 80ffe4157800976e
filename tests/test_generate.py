"""The Python API (`generate`, `stream`) on a tiny random model: streaming equals the whole reply, stop
sequences cut exactly, finish reasons, seeded sampling, prompt and prefix tuning through the KV cache."""

from __future__ import annotations

import pytest

from tunesmith.generation import SamplingParams, generate, prompt_ids, stream
from tunesmith.generation import StopScanner

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_stream_concatenates_to_the_complete_reply(tiny_lm, chatml_tokenizer):
    params = SamplingParams(max_new_tokens=12)
    result: list = []
    pieces = list(stream(tiny_lm, chatml_tokenizer, messages=MESSAGES, params=params, result=result))
    whole = generate(tiny_lm, chatml_tokenizer, messages=MESSAGES, params=params)
    assert "".join(pieces) == whole.text == result[0].text
    assert whole.prompt_tokens == len(prompt_ids(chatml_tokenizer, messages=MESSAGES))


def test_length_finish_when_max_new_tokens_is_reached(tiny_lm, chatml_tokenizer):
    no_eos = {chatml_tokenizer.eos_token_id: -100}  # so the random model cannot stop early
    out = generate(tiny_lm, chatml_tokenizer, prompt="Hello", params=SamplingParams(max_new_tokens=5, logit_bias=no_eos))
    assert out.completion_tokens == 5 and out.finish_reason == "length"


def test_stop_sequence_cuts_the_reply_before_it(tiny_lm, chatml_tokenizer):
    no_eos = {chatml_tokenizer.eos_token_id: -100}
    free = generate(tiny_lm, chatml_tokenizer, prompt="Hello", params=SamplingParams(max_new_tokens=20, logit_bias=no_eos))
    assert len(free.text) > 4
    stop = free.text[3:5]  # a stop sequence that certainly occurs, at position >= 3 ... or earlier
    cut = generate(tiny_lm, chatml_tokenizer, prompt="Hello",
                   params=SamplingParams(max_new_tokens=20, stop=[stop], logit_bias=no_eos))
    assert cut.text == free.text[: free.text.find(stop)]
    assert cut.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(tiny_lm, chatml_tokenizer):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=123)
    a = generate(tiny_lm, chatml_tokenizer, prompt="Hello", params=params)
    b = generate(tiny_lm, chatml_tokenizer, prompt="Hello", params=params)
    assert a.text == b.text


@pytest.mark.parametrize("pieces, stops, expected", [
    (["Hel", "lo wor", "ld"], ["wor"], "Hello "),
    (["a", "b", "c", "d"], ["cd"], "ab"),
    (["abc"], [], "abc"),
    (["x<", "/s", ">y"], ["</s>"], "x"),
])
def test_stop_scanner_never_leaks_part_of_a_stop_sequence(pieces, stops, expected):
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(p) for p in pieces)
    if not scanner.stopped:
        out += scanner.flush()
    assert out == expected


def test_prompt_or_messages_is_required(chatml_tokenizer):
    with pytest.raises(ValueError, match="exactly one"):
        prompt_ids(chatml_tokenizer)


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_prompt_learning_adapter_generates_what_its_forward_pass_predicts(tmp_path, model_dir, method):
    """Greedy `generate` on a prefix/prompt-tuned model equals argmax decoding through the peft model's own
    forward (the path training uses), and differs from the base: the virtual tokens are really applied.
    transformers 5.24 renamed `past_key_values` to `cache` and silently dropped peft's prefix in generate."""
    import torch

    from serve_assets import write_run
    from tunesmith.models import load

    model, tokenizer = load(str(write_run(model_dir, tmp_path / method, method)))
    ids = prompt_ids(tokenizer, messages=MESSAGES)
    expected = list(ids)
    with torch.inference_mode():
        for _ in range(8):
            logits = model(input_ids=torch.tensor([expected]), use_cache=False).logits[0, -1]
            expected.append(int(logits.argmax()))
    got = generate(model, tokenizer, messages=MESSAGES, params=SamplingParams(max_new_tokens=8))
    stop = next((i for i, t in enumerate(expected[len(ids):]) if t == tokenizer.eos_token_id), 8)
    assert got.text == tokenizer.decode(expected[len(ids):len(ids) + stop], skip_special_tokens=True)
    with model.disable_adapter():
        base = generate(model, tokenizer, messages=MESSAGES, params=SamplingParams(max_new_tokens=8))
    assert base.text != got.text


def test_greedy_decoding_leaves_the_global_rng_alone(tiny_lm, chatml_tokenizer):
    """Scoring a model greedily (train's "before") must not shift what later draws from torch's global RNG,
    such as the LoRA initialisation that follows it."""
    import torch

    torch.manual_seed(0)
    state = torch.get_rng_state()
    generate(tiny_lm, chatml_tokenizer, prompt="Hello", params=SamplingParams(max_new_tokens=4))
    assert torch.equal(torch.get_rng_state(), state)

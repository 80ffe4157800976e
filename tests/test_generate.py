"""The Python API (`generate`, `stream`) on a tiny random model: streaming equals the whole reply, stop
sequences cut exactly, finish reasons, seeded sampling, prompt and prefix tuning through the KV cache, and tools
(definitions in the prompt, calls read back into `tool_calls`)."""

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


# ---------------------------------------------------------------------------------------------------------
# tools: the prompt carries the definitions as training rendered them; calls are read back from the reply
# ---------------------------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order.",
                                           "parameters": {"type": "object",
                                                          "properties": {"order_id": {"type": "string"}}}}}]
ORDER = [{"role": "user", "content": "Where is order 42?"}]


class Script:
    """A token mask that makes the model say exactly `ids` (then nothing: the reply must end there)."""

    def __init__(self, ids: list[int], vocab: int):
        self.ids, self.vocab = ids, vocab

    def allowed(self, row):
        import torch

        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[self.ids[len(row.tokens)]] = True
        return mask

    def advance(self, token: int) -> None:
        pass


def saying(model, tokenizer, *texts: str) -> SamplingParams:
    """Greedy settings under which the model's replies are `texts`, in turn (the last one from then on), each
    ended with EOS."""
    replies = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    vocab = model.get_output_embeddings().weight.shape[0]
    made = []

    def next_reply() -> Script:
        made.append(Script(replies[min(len(made), len(replies) - 1)], vocab))
        return made[-1]
    return SamplingParams(max_new_tokens=max(map(len, replies)) + 1, token_mask=next_reply)


def test_a_reply_that_calls_a_tool_comes_back_as_tool_calls(tiny_lm, chatml_tokenizer):
    from tunesmith.data.tokenize import encode_chat_prompt
    from tunesmith.data.tools import format_call

    said = "Let me look.\n" + format_call("lookup_order", {"order_id": "42"})
    params = saying(tiny_lm, chatml_tokenizer, said)
    out = generate(tiny_lm, chatml_tokenizer, messages=ORDER, tools=TOOLS, params=params)
    assert out.text == said and out.finish_reason == "stop"  # the raw text, markup included
    (call,) = out.tool_calls
    assert call["id"].startswith("call_") and len(call["id"]) == 29
    assert call == {"id": call["id"], "type": "function",
                    "function": {"name": "lookup_order", "arguments": '{"order_id": "42"}'}}
    assert out.content == "Let me look."
    assert out.message == {"role": "assistant", "content": "Let me look.", "tool_calls": [call]}
    # The prompt is the training rendering with the definitions (tunesmith's convention for this ChatML model).
    assert out.prompt_tokens == len(encode_chat_prompt(chatml_tokenizer, ORDER, tools=TOOLS)) \
        > len(prompt_ids(chatml_tokenizer, messages=ORDER)) + 50
    assert prompt_ids(chatml_tokenizer, messages=ORDER, tools=TOOLS) == encode_chat_prompt(chatml_tokenizer, ORDER,
                                                                                            tools=TOOLS)


def test_stream_hands_back_the_same_calls_and_a_plain_reply_has_none(tiny_lm, chatml_tokenizer):
    from tunesmith.data.tools import format_call

    said = format_call("lookup_order", {"order_id": "7"})
    result: list = []
    pieces = list(stream(tiny_lm, chatml_tokenizer, messages=ORDER, tools=TOOLS, result=result,
                         params=saying(tiny_lm, chatml_tokenizer, said)))
    assert "".join(pieces) == said and result[0].content is None
    assert [c["function"] for c in result[0].tool_calls] == [{"name": "lookup_order", "arguments": '{"order_id": "7"}'}]
    plain = generate(tiny_lm, chatml_tokenizer, messages=ORDER, tools=TOOLS,
                     params=saying(tiny_lm, chatml_tokenizer, "It has shipped."))
    assert plain.tool_calls is None and plain.content == plain.text == "It has shipped."
    assert plain.message == {"role": "assistant", "content": "It has shipped."}
    # Without tools nothing is read as a call, whatever the reply says.
    untooled = generate(tiny_lm, chatml_tokenizer, messages=ORDER, params=saying(tiny_lm, chatml_tokenizer, said))
    assert untooled.tool_calls is None and untooled.content == said


def test_generate_batch_takes_tools_per_request_or_for_all(tiny_lm, chatml_tokenizer):
    from tunesmith.generation import generate_batch

    requests = [{"messages": ORDER, "tools": TOOLS}, {"messages": ORDER}, {"prompt": "Hello"}]
    params = SamplingParams(max_new_tokens=3)
    outputs = generate_batch(tiny_lm, chatml_tokenizer, requests, params=params)
    assert [o.prompt_tokens for o in outputs] == [len(prompt_ids(chatml_tokenizer, messages=ORDER, tools=TOOLS)),
                                                  len(prompt_ids(chatml_tokenizer, messages=ORDER)),
                                                  len(prompt_ids(chatml_tokenizer, prompt="Hello"))]
    for_all = generate_batch(tiny_lm, chatml_tokenizer, requests[:2], params=params, tools=TOOLS)
    assert [o.prompt_tokens for o in for_all] == [outputs[0].prompt_tokens] * 2
    assert [o.text for o in for_all] == [outputs[0].text] * 2


def test_tools_need_a_chat_conversation(chatml_tokenizer):
    from tunesmith.errors import UsageError

    with pytest.raises(UsageError, match="tools need a chat conversation"):
        prompt_ids(chatml_tokenizer, prompt="Hello", tools=TOOLS)

"""Loss masks of tool conversations, by token positions, on the three ways a call reaches a model: tunesmith's
convention over SmolLM2's ChatML, Qwen2.5-Instruct's `<tool_call>` template and Llama-3.1-Instruct's JSON calls
(both real templates, in tests/templates/). The assistant's call turns are learnable (weight respected), tool
results and tool definitions never; the prompt a served model sees is the training text up to the turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EXTRA_SPECIALS, _wrap
from test_tokenize import ids, learnable_runs

from tunesmith.data.templates import ChatTemplateError, render_chat, render_chat_spans
from tunesmith.data.tokenize import IGNORE_INDEX, MaskError, encode_chat_prompt, tokenize_chat, tokenize_records
from tunesmith.data.tools import definitions_text, format_call

TEMPLATES = Path(__file__).parent / "templates"
# Qwen/Qwen2.5-0.5B-Instruct's and meta-llama/Llama-3.1-8B-Instruct's chat templates (tokenizer_config.json).
QWEN25_TEMPLATE = (TEMPLATES / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
LLAMA31_TOOLS_TEMPLATE = (TEMPLATES / "llama-3.1-instruct.jinja").read_text(encoding="utf-8")

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Find an order by its number.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "create_refund", "description": "Refund an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"},
                                                        "amount": {"type": "number"}}, "required": ["order_id"]}}},
]


def call(call_id: str, name: str, **arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


CONVERSATION = [
    {"role": "system", "content": "You are the bike shop's assistant."},
    {"role": "user", "content": "Where is order 42?"},
    {"role": "assistant", "content": None, "tool_calls": [call("call_1", "lookup_order", order_id="42")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "shipped"},
    {"role": "assistant", "content": "Order 42 has shipped."},
]
# Two calls in one turn, then their two results.
PARALLEL = [
    {"role": "user", "content": "Refund orders 7 and 8."},
    {"role": "assistant", "content": None, "tool_calls": [call("call_1", "create_refund", order_id="7"),
                                                          call("call_2", "create_refund", order_id="8")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "refunded"},
    {"role": "tool", "tool_call_id": "call_2", "content": "refunded"},
    {"role": "assistant", "content": "Both are refunded."},
]
LOOKUP = format_call("lookup_order", {"order_id": "42"})  # <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>


@pytest.fixture
def qwen_tokenizer(bpe):
    """Qwen2.5-Instruct's template and tokens: EOS <|im_end|>; <tool_call> and <tool_response> are added tokens
    that are not special, as in Qwen's tokenizer."""
    from tokenizers import AddedToken

    extended = bpe.__class__.from_str(bpe.to_str())
    extended.add_tokens([AddedToken(t, normalized=False, special=False)
                         for t in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")])
    return _wrap(extended, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN25_TEMPLATE)


@pytest.fixture
def llama31_tools_tokenizer(bpe):
    """Llama-3.1-Instruct's template and tokens: turns end with <|eot_id|> (its EOS), <|python_tag|> and
    <|eom_id|> special too."""
    extended = bpe.__class__.from_str(bpe.to_str())
    extended.add_special_tokens(EXTRA_SPECIALS + ["<|python_tag|>", "<|eom_id|>"])
    return _wrap(extended, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>", chat_template=LLAMA31_TOOLS_TEMPLATE)


def learnable_spans(example) -> list[tuple[int, int]]:
    """(start, end) in the text of each run of learnable tokens."""
    spans, previous = [], False
    for label, (start, end) in zip(example.labels, example.offsets):
        if label != IGNORE_INDEX:
            if previous:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        previous = label != IGNORE_INDEX
    return spans


def span_after(text: str, before: str, learned: str) -> tuple[int, int]:
    """The (start, end) of `learned` where it follows `before` in `text` (which holds that pair exactly once)."""
    assert text.count(before + learned) == 1
    start = text.index(before + learned) + len(before)
    return start, start + len(learned)


def learned_ids(example) -> list[int]:
    return [label for label in example.labels if label != IGNORE_INDEX]


def prompt_length(example) -> int:
    """Tokens before the first learnable one."""
    return next(t for t, label in enumerate(example.labels) if label != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------------
# (a) tunesmith's convention over SmolLM2's ChatML
# ---------------------------------------------------------------------------------------------------------

def test_chatml_convention_learns_the_call_and_the_answer_never_the_definitions_or_the_result(smollm2_tokenizer):
    tok = smollm2_tokenizer
    example = tokenize_chat(tok, CONVERSATION, tools=TOOLS)
    text = example.text
    system = "You are the bike shop's assistant.\n\n" + definitions_text(TOOLS)
    assert text == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhere is order 42?<|im_end|>\n"
                    f"<|im_start|>assistant\n{LOOKUP}<|im_end|>\n<|im_start|>tool\nshipped<|im_end|>\n"
                    "<|im_start|>assistant\nOrder 42 has shipped.<|im_end|>\n")
    assert learnable_spans(example) == [span_after(text, "<|im_start|>assistant\n", LOOKUP + "<|im_end|>"),
                                        span_after(text, "<|im_start|>assistant\n", "Order 42 has shipped.<|im_end|>")]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert learned_ids(example) == ids(tok, LOOKUP) + [im_end] + ids(tok, "Order 42 has shipped.") + [im_end]
    # What a served model is prompted with is the training text up to the call, token for token.
    assert encode_chat_prompt(tok, CONVERSATION[:2], tools=TOOLS) == example.input_ids[:prompt_length(example)]


def test_chatml_convention_parallel_calls_are_one_learnable_turn(smollm2_tokenizer):
    example = tokenize_chat(smollm2_tokenizer, PARALLEL, tools=TOOLS)
    calls = format_call("create_refund", '{"order_id": "7"}') + "\n" + format_call("create_refund", '{"order_id": "8"}')
    assert learnable_runs(example) == [calls + "<|im_end|>", "Both are refunded.<|im_end|>"]
    assert example.text.count("<|im_start|>tool\nrefunded<|im_end|>\n") == 2


# ---------------------------------------------------------------------------------------------------------
# (b) Qwen2.5-Instruct's template: definitions in its system turn, calls in <tool_call> tags, results as user turns
# ---------------------------------------------------------------------------------------------------------

def test_qwen25_learns_the_call_as_its_template_prints_it(qwen_tokenizer):
    tok = qwen_tokenizer
    example = tokenize_chat(tok, CONVERSATION, tools=TOOLS)
    text = example.text
    listed = "\n".join(json.dumps(t) for t in TOOLS)
    assert text.startswith("<|im_start|>system\nYou are the bike shop's assistant.\n\n# Tools\n\nYou may call one "
                           f"or more functions to assist with the user query.\n\nYou are provided with function "
                           f"signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>")
    # Qwen prints a call exactly as the convention does: one parser reads both.
    assert text.endswith("<|im_start|>user\nWhere is order 42?<|im_end|>\n"
                         f"<|im_start|>assistant\n{LOOKUP}<|im_end|>\n"
                         "<|im_start|>user\n<tool_response>\nshipped\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\nOrder 42 has shipped.<|im_end|>\n")
    assert learnable_spans(example) == [span_after(text, "<|im_start|>assistant\n", LOOKUP + "<|im_end|>"),
                                        span_after(text, "<|im_start|>assistant\n", "Order 42 has shipped.<|im_end|>")]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert learned_ids(example) == ids(tok, LOOKUP) + [im_end] + ids(tok, "Order 42 has shipped.") + [im_end]
    assert tok.convert_tokens_to_ids("<tool_call>") in learned_ids(example)  # one added token, learnt as such
    assert encode_chat_prompt(tok, CONVERSATION[:2], tools=TOOLS) == example.input_ids[:prompt_length(example)]


def test_qwen25_content_spans_skip_a_call_turn_without_text(qwen_tokenizer):
    # A placeholder in the call turn's empty content would make Qwen print a text line there: it gets none.
    text, spans = render_chat_spans(qwen_tokenizer, CONVERSATION, tools=TOOLS)
    assert [i for i, _, _ in spans] == [0, 1, 3, 4]
    assert [text[start:end] for _, start, end in spans] == [m["content"] for m in CONVERSATION if m["content"]]


def test_qwen25_parallel_calls_and_their_results(qwen_tokenizer):
    example = tokenize_chat(qwen_tokenizer, PARALLEL, tools=TOOLS)
    calls = format_call("create_refund", {"order_id": "7"}) + "\n" + format_call("create_refund", {"order_id": "8"})
    assert learnable_runs(example) == [calls + "<|im_end|>", "Both are refunded.<|im_end|>"]
    # Qwen gathers consecutive results into one user turn; none of it is learnt.
    assert ("<|im_start|>user\n<tool_response>\nrefunded\n</tool_response>\n<tool_response>\nrefunded\n"
            "</tool_response><|im_end|>\n") in example.text


def test_qwen25_call_turn_with_text_learns_both(qwen_tokenizer):
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["content"] = "Let me look."
    example = tokenize_chat(qwen_tokenizer, messages, tools=TOOLS)
    assert learnable_runs(example) == [f"Let me look.\n{LOOKUP}<|im_end|>", "Order 42 has shipped.<|im_end|>"]


# ---------------------------------------------------------------------------------------------------------
# (c) Llama-3.1-Instruct's template: definitions in the first user turn, {"name", "parameters"} calls, ipython
# ---------------------------------------------------------------------------------------------------------

def test_llama31_learns_the_json_call_and_not_the_ipython_result(llama31_tools_tokenizer):
    tok = llama31_tools_tokenizer
    example = tokenize_chat(tok, CONVERSATION, tools=TOOLS)
    text = example.text
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    definitions = "".join(json.dumps(t, indent=4) + "\n\n" for t in TOOLS)
    call_text = '{"name": "lookup_order", "parameters": {"order_id": "42"}}'
    assert text == ("<|begin_of_text|>" + header.format("system") + "Environment: ipython\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\nYou are the bike shop's assistant.<|eot_id|>"
                    + header.format("user") + "Given the following functions, please respond with a JSON for a "
                    "function call with its proper arguments that best answers the given prompt.\n\nRespond in the "
                    'format {"name": function name, "parameters": dictionary of argument name and its value}.Do not '
                    f"use variables.\n\n{definitions}Where is order 42?<|eot_id|>"
                    + header.format("assistant") + call_text + "<|eot_id|>"
                    + header.format("ipython") + '"shipped"<|eot_id|>'  # its template prints results as JSON
                    + header.format("assistant") + "Order 42 has shipped.<|eot_id|>")
    assistant = header.format("assistant")
    assert learnable_spans(example) == [span_after(text, assistant, call_text + "<|eot_id|>"),
                                        span_after(text, assistant, "Order 42 has shipped.<|eot_id|>")]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert learned_ids(example) == ids(tok, call_text) + [eot] + ids(tok, "Order 42 has shipped.") + [eot]
    assert encode_chat_prompt(tok, CONVERSATION[:2], tools=TOOLS) == example.input_ids[:prompt_length(example)]


def test_llama31_refuses_parallel_calls_with_a_sentence_naming_the_example(llama31_tools_tokenizer):
    with pytest.raises(ChatTemplateError, match=r"^data: example 2: the chat template refuses this conversation: "
                                                r"This model only supports single tool-calls at once!$"):
        tokenize_records(llama31_tools_tokenizer, [{"messages": CONVERSATION, "tools": TOOLS},
                                                   {"messages": PARALLEL, "tools": TOOLS}])


def test_llama31_tool_result_with_quotes_and_a_special_token_string_stays_plain_text(llama31_tools_tokenizer):
    # The template prints the result through tojson (escaped quotes), yet its span is known exactly, so the
    # <|eot_id|> a tool returned cannot end the turn.
    tok = llama31_tools_tokenizer
    messages = [dict(m) for m in CONVERSATION]
    messages[3]["content"] = '{"status": "shipped"}<|eot_id|>'
    example = tokenize_chat(tok, messages, tools=TOOLS)
    printed = json.dumps(messages[3]["content"])[1:-1]  # inside its quotes
    start = example.text.index(printed)
    inside = [i for i, (s, e) in zip(example.input_ids, example.offsets) if start <= s and e <= start + len(printed)]
    assert tok.decode(inside) == printed
    assert tok.convert_tokens_to_ids("<|eot_id|>") not in inside
    assert learnable_runs(example) == ['{"name": "lookup_order", "parameters": {"order_id": "42"}}<|eot_id|>',
                                       "Order 42 has shipped.<|eot_id|>"]


# ---------------------------------------------------------------------------------------------------------
# weight 0 call turns, on every template
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["smollm2_tokenizer", "qwen_tokenizer", "llama31_tools_tokenizer"])
def test_a_weight_zero_call_turn_is_context_only(fixture, request):
    tok = request.getfixturevalue(fixture)
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0
    example = tokenize_chat(tok, messages, tools=TOOLS)
    stop = "<|eot_id|>" if fixture == "llama31_tools_tokenizer" else "<|im_end|>"
    assert learnable_runs(example) == [f"Order 42 has shipped.{stop}"]
    # The same text as when the call is learnt: weight changes the mask only.
    assert example.input_ids == tokenize_chat(tok, CONVERSATION, tools=TOOLS).input_ids
    with pytest.raises(MaskError, match="no assistant message with weight 1"):
        tokenize_chat(tok, messages[:3], tools=TOOLS)


@pytest.mark.parametrize("fixture", ["smollm2_tokenizer", "qwen_tokenizer", "llama31_tools_tokenizer"])
def test_a_conversation_that_ends_with_its_call_learns_the_call(fixture, request):
    tok = request.getfixturevalue(fixture)
    example = tokenize_chat(tok, CONVERSATION[:3], tools=TOOLS)
    (run,) = learnable_runs(example)
    assert '"lookup_order"' in run and example.text.endswith(run + ("" if "llama" in fixture else "\n"))


def test_the_mask_check_names_the_function_a_call_turn_lost(qwen_tokenizer):
    # A template that prints a call turn without its function's name cannot be trained on: the check says so.
    broken = QWEN25_TEMPLATE.replace("{{- tool_call.name }}", "")
    with pytest.raises(MaskError, match="does not contain 'lookup_order'; the mask is misaligned"):
        tokenize_chat(qwen_tokenizer, CONVERSATION, tools=TOOLS, chat_template=broken)


# ---------------------------------------------------------------------------------------------------------
# the fallbacks: a tool result is a tool turn
# ---------------------------------------------------------------------------------------------------------

def test_plain_fallback_renders_a_tool_result_as_a_tool_turn(plain_tokenizer):
    example = tokenize_chat(plain_tokenizer, CONVERSATION[1:], tools=TOOLS[:1])
    assert example.text == (f"{definitions_text(TOOLS[:1])}\n\nUser: Where is order 42?\n\n"
                            f"Assistant: {LOOKUP}<|endoftext|>\n\nTool: shipped\n\n"
                            "Assistant: Order 42 has shipped.<|endoftext|>\n\n")
    assert learnable_runs(example) == [f" {LOOKUP}<|endoftext|>", " Order 42 has shipped.<|endoftext|>"]
    assert render_chat(plain_tokenizer, CONVERSATION[1:4], add_generation_prompt=True).endswith(
        "Tool: shipped\n\nAssistant:")


def test_llama3_fallback_renders_a_tool_result_under_a_tool_header(llama3_tokenizer):
    example = tokenize_chat(llama3_tokenizer, CONVERSATION[1:], tools=TOOLS[:1])
    assert "<|eot_id|><|start_header_id|>tool<|end_header_id|>\n\nshipped<|eot_id|>" in example.text
    assert learnable_runs(example) == [f"{LOOKUP}<|eot_id|>", "Order 42 has shipped.<|eot_id|>"]


# ---------------------------------------------------------------------------------------------------------
# what run.json records of a run trained on tool data
# ---------------------------------------------------------------------------------------------------------

def test_a_run_records_how_its_template_rendered_tools_only_when_its_data_has_them():
    from conftest import SMOLLM2_TEMPLATE

    from tunesmith.training.data import tool_rendering

    with_tools = [{"messages": CONVERSATION, "tools": TOOLS}]
    assert tool_rendering(with_tools, SMOLLM2_TEMPLATE) == {"mode": "convention", "style": "hermes"}
    assert tool_rendering(with_tools, QWEN25_TEMPLATE) == {"mode": "native", "style": "hermes"}
    assert tool_rendering(with_tools, LLAMA31_TOOLS_TEMPLATE) == {"mode": "native", "style": "json"}
    # Tool turns alone (no definitions) are tool data too; plain chat and completions are not.
    assert tool_rendering([{"messages": CONVERSATION}], QWEN25_TEMPLATE) == {"mode": "native", "style": "hermes"}
    assert tool_rendering([{"messages": CONVERSATION[:2]}, {"prompt": "a", "completion": "b"}], QWEN25_TEMPLATE) is None



def test_generation_reads_calls_back_in_the_style_the_template_prints_them(llama31_tools_tokenizer):
    from conftest import build_tiny_llama
    from test_generate import saying

    from tunesmith.generation import generate

    model = build_tiny_llama(llama31_tools_tokenizer).eval()
    said = '{"name": "lookup_order", "parameters": {"order_id": "42"}}'
    out = generate(model, llama31_tools_tokenizer, messages=CONVERSATION[:2], tools=TOOLS,
                   params=saying(model, llama31_tools_tokenizer, said))
    assert out.text == said and out.content is None
    assert [c["function"] for c in out.tool_calls] == [{"name": "lookup_order", "arguments": '{"order_id": "42"}'}]
    # Its prompt is the training text up to the call.
    example = tokenize_chat(llama31_tools_tokenizer, CONVERSATION[:3], tools=TOOLS)
    assert out.prompt_tokens == prompt_length(example)

"""Scoring tool turns: the metric functions (call exact match order-free over parsed JSON arguments, arguments
checked against the function's schema, no-call accuracy, per function) against values worked out by hand, the
gold and request an eval record gives, and `evaluate()` end to end on a tiny model: tools in the prompt, calls
parsed from the reply, exact metrics and the calls shown in predictions.jsonl."""

from __future__ import annotations

import json

import pytest

from tunesmith.data.tools import for_template
from tunesmith.evaluation import evaluate, scorers
from tunesmith.generation import SamplingParams, generate
from tunesmith.metrics import arguments_valid, calls_match, reply_matches, tool_metrics


def call(name: str, arguments, id: str = "call_1") -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": id, "type": "function", "function": {"name": name, "arguments": args}}


def tool(name: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} an order",
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


ORDER = {"order_id": {"type": "string", "pattern": "^NW-[0-9]{5}$"}}
TOOLS = [tool("lookup_order", ORDER, ["order_id"]),
         tool("create_refund", {**ORDER, "reason": {"type": "string", "enum": ["damaged", "unwanted"]}},
              ["order_id", "reason"])]


# ---------------------------------------------------------------------------------------------------------
# metric functions
# ---------------------------------------------------------------------------------------------------------

def test_calls_match_compares_parsed_arguments_in_any_order():
    a, b = call("lookup_order", {"order_id": "NW-10001"}), call("create_refund", {"order_id": "NW-1", "n": 1})
    assert calls_match([a, b], [b, a])  # parallel calls have no order
    assert calls_match([call("create_refund", '{"n": 1.0, "order_id":"NW-1"}', id="x")], [b])  # keys, spaces, 1.0
    assert not calls_match([call("create_refund", {"order_id": "NW-1", "n": True})], [b])  # true is not 1
    assert not calls_match([a], [a, b]) and not calls_match([a, b], [a]) and not calls_match([a, a], [a, b])
    assert not calls_match([call("lookup_order", {"order_id": "NW-10002"})], [a])
    assert not calls_match([call("create_refund", {"order_id": "NW-10001"})], [call("lookup_order", {"order_id":
                                                                                                     "NW-10001"})])
    assert not calls_match([call("lookup_order", '{"order_id": "NW-10001"')], [a])  # arguments that do not parse
    assert calls_match(None, None) and calls_match([], None) and not calls_match(None, [a]) and not calls_match([a], None)


def test_arguments_valid_checks_the_functions_schema():
    assert arguments_valid(call("create_refund", {"order_id": "NW-12345", "reason": "damaged"}), TOOLS)
    assert not arguments_valid(call("create_refund", {"order_id": "NW-12345"}), TOOLS)  # a required one missing
    assert not arguments_valid(call("create_refund", {"order_id": "NW-12345", "reason": "bored"}), TOOLS)  # enum
    assert not arguments_valid(call("lookup_order", {"order_id": "12345"}), TOOLS)  # pattern
    assert not arguments_valid(call("lookup_order", '{"order_id": "NW-12345"'), TOOLS)  # not JSON
    assert not arguments_valid(call("lookup_order", '["NW-12345"]'), TOOLS)  # not an object
    assert not arguments_valid(call("cancel_order", {"order_id": "NW-12345"}), TOOLS)  # no such function
    bare = [{"name": "ping"}, {"name": "broken", "parameters": {"type": "objekt"}}]  # `functions` entries
    assert arguments_valid(call("ping", {"anything": [1]}), bare)  # no parameters: any object
    assert not arguments_valid(call("broken", {}), bare)  # a schema that is not one validates nothing


def test_tool_metrics_by_hand():
    lookup, refund = call("lookup_order", {"order_id": "NW-10001"}), call("create_refund",
                                                                           {"order_id": "NW-10001",
                                                                            "reason": "damaged"})
    bad_refund = call("create_refund", {"order_id": "NW-10001", "reason": "bored"})
    gold = [[lookup], [lookup, refund], [refund], None, None]
    predicted = [[lookup], [refund, lookup], [bad_refund], None, [lookup]]
    m = tool_metrics(predicted, gold, [TOOLS] * 5, details=True)
    # call turns: 2 of 3 match; predicted calls: 5, all but bad_refund valid; plain turns: 1 of 2 made no call
    assert m == {"call_exact_match": pytest.approx(2 / 3), "arguments_valid": pytest.approx(4 / 5),
                 "no_call_accuracy": 0.5,
                 "per_function": {"create_refund": {"exact_match": 0.5, "support": 2},
                                  "lookup_order": {"exact_match": 1.0, "support": 2}}}
    # a rate with nothing to count is left out, not reported as 0 or 1
    assert tool_metrics([None, None], [[lookup], None], [TOOLS] * 2) == {"call_exact_match": 0.0,
                                                                        "no_call_accuracy": 1.0}


def test_reply_matches_is_call_match_for_call_turns_and_text_match_otherwise():
    lookup = call("lookup_order", {"order_id": "NW-10001"})
    assert reply_matches("anything", [lookup], "<tool_call>...", [lookup])
    assert not reply_matches("Your order shipped.", None, "<tool_call>...", [lookup])
    assert reply_matches(" Your order shipped.\n", None, "Your order shipped.", None)
    assert not reply_matches("Your order shipped.", [lookup], "Your order shipped.", None)  # called when none due


# ---------------------------------------------------------------------------------------------------------
# what a record asks and expects; what a reply calls
# ---------------------------------------------------------------------------------------------------------

LOOKUP = call("lookup_order", {"order_id": "NW-10001"})
CALL_TURN = {"tools": TOOLS, "messages": [{"role": "user", "content": "Where is NW-10001?"},
                                          {"role": "assistant", "content": None, "tool_calls": [LOOKUP]}]}
ANSWER_TURN = {"tools": TOOLS, "messages": [*CALL_TURN["messages"],
                                            {"role": "tool", "tool_call_id": "call_1", "content": "shipped"},
                                            {"role": "assistant", "content": "It shipped."}]}
PLAIN_TURN = {"tools": TOOLS, "messages": [{"role": "user", "content": "Hi!"},
                                           {"role": "assistant", "content": "Hello."}]}
NO_TOOLS = {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]}


def test_split_reference_keeps_the_tools_and_the_gold_calls():
    ref = scorers.split_reference(CALL_TURN)
    assert ref.request == {"messages": CALL_TURN["messages"][:1], "tools": TOOLS}
    assert ref.calls == [LOOKUP] and ref.tools == TOOLS
    assert ref.text == '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "NW-10001"}}\n</tool_call>'
    ref = scorers.split_reference(ANSWER_TURN)
    assert ref.request["messages"] == ANSWER_TURN["messages"][:3] and ref.text == "It shipped." and ref.calls is None
    assert scorers.split_reference(NO_TOOLS) == scorers.Reference({"messages": NO_TOOLS["messages"][:1]}, "Hello.")


def test_a_call_that_does_not_parse_is_scored_as_a_wrong_call():
    text = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "NW-1}\n</tool_call>'
    parsed, scored = scorers.scored_calls(text, "hermes")
    assert parsed is None and scored == [{"type": "function", "function": {"name": "", "arguments": text}}]
    assert tool_metrics([scored], [None], [TOOLS]) == {"arguments_valid": 0.0, "no_call_accuracy": 0.0}
    good = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "NW-10001"}}\n</tool_call>'
    assert scorers.scored_calls(good, "hermes") == ([{"type": "function", "function": LOOKUP["function"]}],) * 2
    assert scorers.scored_calls("It shipped.", "hermes") == (None, None)
    assert scorers.scored_calls('{"name": "lookup_order", "parameters": {"order_id": 5', "json")[1][0]["function"][
        "name"] == ""
    assert scorers.scored_calls('{"intent": "refund"}', "json") == (None, None)  # JSON, but not a call


# ---------------------------------------------------------------------------------------------------------
# evaluate() end to end
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def long_lm(chatml_tokenizer):
    from conftest import build_tiny_llama

    return build_tiny_llama(chatml_tokenizer, max_position_embeddings=2048).eval()


def test_eval_puts_the_tools_in_the_prompt(long_lm, chatml_tokenizer):
    params = SamplingParams(max_new_tokens=8)
    result = evaluate((long_lm, chatml_tokenizer), [CALL_TURN, ANSWER_TURN, PLAIN_TURN, NO_TOOLS], params=params)
    template = chatml_tokenizer.chat_template
    for prediction, record in zip(result.predictions, [CALL_TURN, ANSWER_TURN, PLAIN_TURN, NO_TOOLS]):
        # the convention's rendering (definitions in the system turn) as plain messages: the same prompt ids
        messages, _ = for_template(prediction["input"]["messages"], record.get("tools"), template)
        assert prediction["prediction"] == generate(long_lm, chatml_tokenizer, messages=messages, params=params).text
    without = generate(long_lm, chatml_tokenizer, messages=CALL_TURN["messages"][:1], params=params).text
    assert result.predictions[0]["prediction"] != without
    assert [p.keys() for p in result.predictions] == [{"input", "gold", "prediction", "correct", "gold_calls",
                                                       "calls"}] * 3 + [{"input", "gold", "prediction", "correct"}]


def test_eval_scores_tool_turns_exactly(long_lm, chatml_tokenizer, tmp_path, monkeypatch):
    refund = call("create_refund", {"order_id": "NW-10001", "reason": "damaged"}, id="call_2")
    parallel = {"tools": TOOLS, "messages": [{"role": "user", "content": "Refund NW-10001, and where is it?"},
                                             {"role": "assistant", "content": None, "tool_calls": [LOOKUP, refund]}]}
    replies = ['<tool_call>\n{"name": "create_refund", "arguments": {"reason": "damaged", "order_id": "NW-10001"}}'
               '\n</tool_call>\n<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "NW-10001"}}\n'
               '</tool_call>',  # parallel calls in the other order: right
               '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "NW-1"}}\n</tool_call>',  # wrong id
               "It shipped.",  # right words, no call
               '<tool_call>\n{"name": "lookup_order"\n</tool_call>',  # a broken call where none was due
               "Hello."]
    monkeypatch.setattr(scorers, "_replies", lambda *args, **kwargs: [(reply, None) for reply in replies])
    records = [parallel, CALL_TURN, ANSWER_TURN, PLAIN_TURN, NO_TOOLS]
    result = evaluate((long_lm, chatml_tokenizer), records, output_dir=tmp_path)
    m = result.metrics
    assert m["exact_match"] == pytest.approx(3 / 5)  # records 1, 3, 5
    assert {k: m[k] for k in ("call_exact_match", "arguments_valid", "no_call_accuracy", "per_function")} == {
        "call_exact_match": 0.5, "arguments_valid": pytest.approx(2 / 4), "no_call_accuracy": 0.5,
        "per_function": {"create_refund": {"exact_match": 1.0, "support": 1},
                         "lookup_order": {"exact_match": 0.5, "support": 2}}}
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line["correct"] for line in lines] == [True, False, True, False, True]
    assert lines[1]["calls"] == [{"type": "function", "function": {"name": "lookup_order",
                                                                   "arguments": '{"order_id": "NW-1"}'}}]
    assert lines[1]["gold_calls"] == [LOOKUP] and lines[3]["calls"] is None and lines[2]["gold_calls"] is None
    assert lines[0]["input"] == {"messages": parallel["messages"][:1], "tools": TOOLS}

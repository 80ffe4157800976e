"""Tool-calling data: OpenAI's tools / tool_calls / tool messages, the older functions / function_call spelling
and LLaMA-Factory's ShareGPT function_call / observation turns read into one internal shape; every tool problem
at its file:line: field (schema breaks as warnings); conversion keeps tools as chat and refuses completion;
`data preview` shows definitions, calls and results with only the assistant's turns learnable."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main
from tunesmith.data.formats import (DataError, convert_file, detect_format, kind_of, read_records, to_completion,
                                    validate)

PARAMETERS = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}
LOOKUP = {"name": "lookup_order", "description": "Find an order.", "parameters": PARAMETERS}
TOOLS = [{"type": "function", "function": LOOKUP}]
USER = {"role": "user", "content": "Where are orders 42 and 43?"}
ANSWER = {"role": "assistant", "content": "Both have shipped."}


def call(call_id, order, name="lookup_order"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps({"order_id": order})}}


def result(call_id, text="shipped"):
    return {"role": "tool", "content": text, "tool_call_id": call_id}


def calls(*tool_calls):
    return {"role": "assistant", "content": None, "tool_calls": list(tool_calls)}


# The internal record every spelling below reads into: two parallel calls, two results, a reply.
INTERNAL = {"messages": [USER, calls(call("call_0", "42"), call("call_1", "43")), result("call_0"),
                         result("call_1"), ANSWER], "tools": TOOLS}


def write(tmp_path, name: str, records) -> str:
    (tmp_path / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return name


def problems_and_warnings(path) -> tuple[list[str], list[str]]:
    report = validate(path)
    return [str(p) for p in report.problems], [str(w) for w in report.warnings]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Relative names, so problems name the file as a user typed it: "data.jsonl:3: ..."."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# reading: every spelling becomes the internal record
# ---------------------------------------------------------------------------------------------------------

def test_openai_tools_calls_and_results_are_read_as_they_are(tmp_path):
    # Content absent on the call turn, results answered out of order by id: both as OpenAI allows.
    record = {"tools": TOOLS, "messages": [
        USER, {"role": "assistant", "tool_calls": [call("a", "42"), call("b", "43")]},
        result("b", "in transit"), result("a"), ANSWER | {"weight": 1}]}
    assert read_records(write(tmp_path, "data.jsonl", [record])) == [{"tools": TOOLS, "messages": [
        USER, calls(call("a", "42"), call("b", "43")), result("b", "in transit"), result("a"),
        ANSWER | {"weight": 1}]}]


def test_the_older_functions_spelling_becomes_tools_with_generated_ids(tmp_path):
    record = {"functions": [LOOKUP], "messages": [
        USER, {"role": "assistant", "content": None,
               "function_call": {"name": "lookup_order", "arguments": '{"order_id": "42"}'}},
        {"role": "function", "name": "lookup_order", "content": "shipped"},
        {"role": "assistant", "content": "",
         "function_call": {"name": "lookup_order", "arguments": {"order_id": "43"}}},
        {"role": "function", "name": "lookup_order", "content": "shipped"}, ANSWER]}
    assert read_records(write(tmp_path, "data.jsonl", [record])) == [{"tools": TOOLS, "messages": [
        USER, calls(call("call_0", "42")), result("call_0") | {"name": "lookup_order"},
        calls(call("call_1", "43")), result("call_1") | {"name": "lookup_order"}, ANSWER]}]


def test_sharegpt_function_call_and_observation_turns_read_like_openai(tmp_path):
    # LLaMA-Factory's tool format: tools as JSON text of bare functions, calls as JSON text (a list = parallel).
    parallel = json.dumps([{"name": "lookup_order", "arguments": {"order_id": "42"}},
                           {"name": "lookup_order", "arguments": {"order_id": "43"}}])
    record = {"tools": json.dumps([LOOKUP]), "conversations": [
        {"from": "human", "value": USER["content"]}, {"from": "function_call", "value": parallel},
        {"from": "observation", "value": "shipped"}, {"from": "observation", "value": "shipped"},
        {"from": "gpt", "value": ANSWER["content"]}]}
    openai = {"tools": TOOLS, "messages": [USER, calls(call("x", "42"), call("y", "43")), result("x"), result("y"),
                                           ANSWER]}
    assert read_records(write(tmp_path, "lf.jsonl", [record])) == [INTERNAL]
    # The same conversation in OpenAI's format differs only by the ids it chose.
    assert json.dumps(read_records(write(tmp_path, "oa.jsonl", [openai]))).replace('"x"', '"call_0"').replace(
        '"y"', '"call_1"') == json.dumps([INTERNAL])


def test_tools_entries_in_three_shapes_become_openai_entries(tmp_path):
    flat = {"type": "function", **LOOKUP}  # the Responses API's shape
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    record = {"tools": [flat, weather], "messages": [USER, ANSWER]}
    assert read_records(write(tmp_path, "data.jsonl", [record]))[0]["tools"] == [
        {"type": "function", "function": LOOKUP}, {"type": "function", "function": weather}]


@pytest.mark.parametrize("tools", [None, [], ""])
def test_records_without_tools_read_exactly_as_before(tmp_path, tools):
    record = {"messages": [USER, ANSWER | {"weight": 1, "tool_calls": None}], "tools": tools}
    assert read_records(write(tmp_path, "data.jsonl", [record])) == [{"messages": [USER, ANSWER | {"weight": 1}]}]


def test_a_lone_call_turn_is_a_learnable_assistant_turn(tmp_path):
    only_call = {"tools": TOOLS, "messages": [USER, calls(call("a", "42"))]}
    unlearned = {"tools": TOOLS, "messages": [USER, calls(call("a", "42")) | {"weight": 0}]}
    assert read_records(write(tmp_path, "a.jsonl", [only_call])) == [only_call]
    assert problems_and_warnings(write(tmp_path, "b.jsonl", [unlearned])) == (
        ["b.jsonl:1: messages: no assistant turn to learn from"], [])


def test_tool_records_are_detected_as_chat(tmp_path):
    assert detect_format(write(tmp_path, "oa.jsonl", [INTERNAL])) == "openai-chat"
    assert detect_format(write(tmp_path, "old.jsonl", [{"functions": [LOOKUP], "messages": [USER, ANSWER]}])) \
        == "openai-chat"
    sharegpt = {"tools": json.dumps([LOOKUP]), "conversations": [
        {"from": "human", "value": "hi"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'}]}
    assert detect_format(write(tmp_path, "lf.jsonl", [sharegpt])) == "sharegpt"
    assert kind_of(INTERNAL) == "chat"


# ---------------------------------------------------------------------------------------------------------
# validation: each problem at file:line: field
# ---------------------------------------------------------------------------------------------------------

def chat(*messages, tools=TOOLS, **extra):
    return {"messages": [USER, *messages], **({"tools": tools} if tools is not None else {}), **extra}


def bad_arguments(arguments):
    return chat({"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
        "name": "lookup_order", "arguments": arguments}}]})


@pytest.mark.parametrize("bad, expected", [
    (bad_arguments("{'order_id': 42}"), "messages[1].tool_calls[0].function.arguments: arguments must be a JSON "
     "object string, but it is not JSON: Expecting property name enclosed in double quotes (column 2)"),
    (bad_arguments('["42"]'),
     "messages[1].tool_calls[0].function.arguments: arguments must be a JSON object string, got a JSON list"),
    (bad_arguments(42), "messages[1].tool_calls[0].function.arguments: arguments must be a JSON object string, "
     "got number"),
    (bad_arguments(None), 'messages[1].tool_calls[0].function.arguments: missing arguments (a call without any '
     'has "{}")'),
    (chat(calls(call("a", "42", name="cancel_order"))), "messages[1].tool_calls[0].function.name: a call to "
     "'cancel_order', which is not in tools (tools: 'lookup_order')"),
    (chat(calls(call("a", "42")), tools=None),
     "messages[1].tool_calls[0].function.name: a call to 'lookup_order', which is not in tools (the record has none)"),
    (chat(calls(call("a", "42")), result("b"), ANSWER),
     "messages[2].tool_call_id: tool_call_id 'b' answers no earlier call (earlier calls: 'a')"),
    (chat(result("a"), ANSWER), "messages[1].tool_call_id: tool_call_id 'a' answers no earlier call"),
    (chat({"role": "tool", "content": "shipped"}, ANSWER),
     "messages[1].tool_call_id: a tool result that answers no earlier call (no call is waiting for one)"),
    (chat(calls(call("a", "42"), call("a", "43"))), "messages[1].tool_calls[1].id: id 'a' is already an earlier "
     "call's"),
    (chat(ANSWER, tools=[{"type": "retrieval"}]), "tools[0].type: only function tools are supported, got type "
     "'retrieval'"),
    (chat(ANSWER, tools=[{"type": "function", "function": {"description": "no name"}}]),
     "tools[0].function.name: missing name"),
    (chat(ANSWER, tools=["lookup_order"]), "tools[0]: a tools entry must be an object, got string"),
    (chat(ANSWER, tools=[LOOKUP | {"parameters": {"type": "object", "properties": {"order_id": {"type": "text"}}}}]),
     "tools[0].parameters.properties.order_id.type: parameters is not a valid JSON schema: 'text' is not valid "
     "under any of the given schemas"),
    (chat(ANSWER, tools=[LOOKUP | {"parameters": {"$schema": ["draft-07"], "type": "object"}}]),
     "tools[0].parameters.$schema: parameters is not a valid JSON schema: $schema must be a string (the URI of a "
     "JSON schema draft), got list"),
    (chat(ANSWER, tools=[LOOKUP | {"parameters": {"type": "string"}}]),
     "tools[0].parameters.type: parameters must describe an object (arguments always are one), got type 'string'"),
    (chat(ANSWER, tools=[LOOKUP | {"parameters": "order_id: string"}]),
     "tools[0].parameters: parameters must be a JSON schema object, got string"),
    (chat(ANSWER, tools=[LOOKUP, LOOKUP]), "tools[1]: function 'lookup_order' is defined twice"),
    (chat(ANSWER, tools="[{oops"), "tools: tools is a string but not JSON: Expecting property name enclosed in "
     "double quotes (column 3)"),
    (chat(ANSWER, functions=[LOOKUP]), "functions: give tools or functions, not both"),
    (chat(ANSWER | {"function_call": {"name": "lookup_order", "arguments": "{}"}, "tool_calls": [call("a", "1")]}),
     "messages[1].function_call: give tool_calls or function_call, not both"),
    (chat({"role": "user", "content": "x", "tool_calls": [call("a", "1")]}, ANSWER),
     "messages[1].tool_calls: only assistant messages make calls, not 'user'"),
])
def test_openai_tool_problems(tmp_path, bad, expected):
    path = write(tmp_path, "data.jsonl", [INTERNAL, bad, INTERNAL])
    assert problems_and_warnings(path) == ([f"data.jsonl:2: {expected}"], [])


def sharegpt(*turns):
    return {"tools": json.dumps([LOOKUP]), "conversations": [{"from": "human", "value": "hi"}, *turns]}


@pytest.mark.parametrize("bad, expected", [
    (sharegpt({"from": "function_call", "value": "lookup_order(42)"}),
     "conversations[1].value: a function_call value must be JSON: Expecting value (column 1)"),
    (sharegpt({"from": "function_call", "value": "[]"}), 'conversations[1].value: a function_call value must be a '
     '{"name", "arguments"} object or a non-empty list of them, got list'),
    (sharegpt({"from": "function_call", "value": '{"name": "lookup_order", "arguments": "42"}'}),
     "conversations[1].value.arguments: arguments must be a JSON object string, got a JSON number"),
    (sharegpt({"from": "function_call", "value": '[{"name": "refund", "arguments": {}}]'}),
     "conversations[1].value[0].name: a call to 'refund', which is not in tools (tools: 'lookup_order')"),
    (sharegpt({"from": "observation", "value": "shipped"}, {"from": "gpt", "value": "ok"}),
     "conversations[1]: a tool result that answers no earlier call (no call is waiting for one)"),
])
def test_sharegpt_tool_problems(tmp_path, bad, expected):
    path = write(tmp_path, "data.jsonl", [bad])
    assert problems_and_warnings(path) == ([f"data.jsonl:1: {expected}"], [])


def test_arguments_that_break_the_schema_are_a_warning_and_the_record_is_kept(tmp_path):
    record = chat(calls(call("a", 42), {"id": "b", "type": "function",
                                        "function": {"name": "lookup_order", "arguments": "{}"}}))
    path = write(tmp_path, "data.jsonl", [record])
    assert problems_and_warnings(path) == ([], [
        "data.jsonl:1: messages[1].tool_calls[0].function.arguments: arguments do not match the parameters of "
        "'lookup_order': 42 is not of type 'string' (at arguments.order_id) (allowed, but the model learns a call "
        "the function would reject)",
        "data.jsonl:1: messages[1].tool_calls[1].function.arguments: arguments do not match the parameters of "
        "'lookup_order': 'order_id' is a required property (allowed, but the model learns a call the function "
        "would reject)"])
    assert read_records(path) == [record]


def test_validate_cli_names_tool_problems_and_warnings(tmp_path, capsys):
    path = write(tmp_path, "data.jsonl", [chat(calls(call("a", 42))), bad_arguments("[]")])
    assert main(["data", "validate", path]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "data.jsonl:1: messages[1].tool_calls[0].function.arguments: arguments do not match the parameters of "
        "'lookup_order': 42 is not of type 'string' (at arguments.order_id) (allowed, but the model learns a call "
        "the function would reject) (warning)",
        "data.jsonl:2: messages[1].tool_calls[0].function.arguments: arguments must be a JSON object string, got a "
        "JSON list",
        "data.jsonl: 1 problem(s) in openai-chat data"]


# ---------------------------------------------------------------------------------------------------------
# conversion and preview
# ---------------------------------------------------------------------------------------------------------

def test_convert_sharegpt_and_old_spelling_to_openai_chat_keeps_tools(tmp_path):
    lf = sharegpt({"from": "function_call", "value": '{"name": "lookup_order", "arguments": {"order_id": "42"}}'},
                  {"from": "observation", "value": "shipped"}, {"from": "gpt", "value": "It shipped."})
    old = {"functions": [LOOKUP], "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "function_call": {"name": "lookup_order", "arguments": '{"order_id": "42"}'}},
        {"role": "function", "name": "lookup_order", "content": "shipped"},
        {"role": "assistant", "content": "It shipped."}]}
    expected = {"messages": [{"role": "user", "content": "hi"}, calls(call("call_0", "42")), result("call_0"),
                             {"role": "assistant", "content": "It shipped."}], "tools": TOOLS}
    assert convert_file(write(tmp_path, "lf.jsonl", [lf]), "lf-out.jsonl", to="chat") == 1
    assert convert_file(write(tmp_path, "old.jsonl", [old]), "old-out.jsonl", to="chat") == 1
    assert [json.loads(line) for line in (tmp_path / "lf-out.jsonl").read_text().splitlines()] == [expected]
    assert [json.loads(line) for line in (tmp_path / "old-out.jsonl").read_text().splitlines()] == [
        expected | {"messages": expected["messages"][:2] + [result("call_0") | {"name": "lookup_order"}]
                    + expected["messages"][3:]}]
    # What convert writes reads back as the same records (OpenAI's format, detected as such).
    assert detect_format("lf-out.jsonl") == "openai-chat" and read_records("lf-out.jsonl") == [expected]


def test_a_tool_conversation_has_no_completion_form(tmp_path, capsys):
    with pytest.raises(DataError) as err:
        to_completion(INTERNAL)
    assert str(err.value) == ("a tool conversation (tools, tool calls or tool results) has no completion form: "
                              "keep it as chat (convert --to chat, or sft_format: chat)")
    path = write(tmp_path, "data.jsonl", [{"messages": [USER, ANSWER]}, {"messages": [USER, ANSWER], "tools": TOOLS}])
    assert main(["data", "convert", path, "--to", "completion", "-o", "out.jsonl"]) == 1
    assert not (tmp_path / "out.jsonl").exists()
    assert capsys.readouterr().err.strip() == f"tunesmith: error: data.jsonl: record 2: {err.value}"


def test_preview_shows_definitions_calls_and_results_and_marks_only_the_assistant(tmp_path, model_dir, capsys):
    record = {"tools": TOOLS, "messages": [{"role": "user", "content": "Where is order 42?"},
                                           calls(call("a", "42")), result("a"), ANSWER]}
    path = write(tmp_path, "data.jsonl", [record])
    assert main(["data", "preview", path, "--model", str(model_dir), "--no-color"]) == 0
    out = capsys.readouterr().out
    definition = json.dumps({"type": "function", "function": LOOKUP})
    assert f"<|im_start|>system\n# Tools\n\n" in out and f"<tools>\n{definition}\n</tools>" in out
    assert ("<|im_start|>user\nWhere is order 42?<|im_end|>\n"
            '<|im_start|>assistant\n⟦<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "42"}}\n'
            "</tool_call><|im_end|>⟧\n"
            "<|im_start|>tool\nshipped<|im_end|>\n"
            "<|im_start|>assistant\n⟦Both have shipped.<|im_end|>⟧\n") in out
    assert out.count("⟦") == 2  # the call turn and the reply; never the definitions or the result

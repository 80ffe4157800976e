"""Tool calling through the server, against a live uvicorn server with the official `openai` client and LangChain:
forced calls (tool_choice "required" or a named function, constrained decoding) have OpenAI's exact shape and
their arguments validate, streamed calls add up to the non-streamed ones, tool results render into the next
prompt exactly as training renders them, and replies under "auto" (scripted, since a tiny random model will
not call by itself) come back as `tool_calls`, never as raw markup in `content`."""

from __future__ import annotations

import json

import jsonschema
import pytest
from serve_assets import ADD, SCHEMAS, TOOLS, WINDOW, check_call, streamed_calls, uvicorn_on_loopback, write_base

KEY = "test-key"
BASE = "base"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def live(bpe, tmp_path_factory):
    """A live server over the tiny model (ChatML: the tools convention), its engine, and the requests it took."""
    from types import SimpleNamespace

    from tunesmith.serve import ServeSettings, create_app, load_engine

    root = tmp_path_factory.mktemp("tools")
    base = write_base(bpe, root / "base", context=WINDOW)
    (base / "run.json").write_text(json.dumps({"task": "sft", "base_model": "tiny", "method": "full", "peft": False,
                                               "tools": {"mode": "convention", "style": "hermes"}}))
    engine = load_engine(str(base), max_batch=8)
    engine.models = {BASE: next(iter(engine.models.values()))}
    engine.models[BASE].run = str(base)
    seen = []
    submit = engine.submit
    engine.submit = lambda requests: (seen.extend(requests), submit(requests))[1]
    settings = ServeSettings(api_key=KEY, conversations=str(root / "c.sqlite"))
    with uvicorn_on_loopback(create_app(engine, settings)) as url:
        yield SimpleNamespace(url=url, engine=engine, seen=seen, submit=submit)


@pytest.fixture
def sdk(live):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(sdk, **kw):
    return sdk.chat.completions.create(model=BASE, **{"messages": USER, "tools": TOOLS, "max_tokens": 200,
                                                      "temperature": 1.0, **kw})


# -- forced calls: constrained decoding ------------------------------------------------------------------------

def test_required_and_named_calls_have_openai_shape_and_validate(sdk):
    ids = set()
    for seed in range(6):
        reply = ask(sdk, tool_choice="required", parallel_tool_calls=False, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0])
        ids.add(choice.message.tool_calls[0].id)
    assert len(ids) == 6  # every call id is new
    for name in SCHEMAS:
        reply = ask(sdk, tool_choice={"type": "function", "function": {"name": name}}, seed=1)
        assert [c.function.name for c in reply.choices[0].message.tool_calls] == [name]
        check_call(reply.choices[0].message.tool_calls[0], [name])


def test_parallel_calls_under_required(sdk):
    # The random model writes a second call when its sampled tokens say so: the first seed that does, of ten.
    replies = (ask(sdk, tool_choice="required", seed=seed, max_tokens=400) for seed in range(10))
    reply = next((r for r in replies if len(r.choices[0].message.tool_calls) >= 2), None)
    assert reply is not None, "no seed of ten gave two calls"
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    for call in calls:
        check_call(call)
    assert len({c.id for c in calls}) == len(calls)


def test_streamed_calls_add_up_to_the_non_streamed_reply(sdk):
    for kw in ({"tool_choice": "required", "seed": 3, "max_tokens": 400},
               {"tool_choice": {"type": "function", "function": {"name": "add"}}, "seed": 5}):
        whole = ask(sdk, **kw).choices[0]
        chunks = list(ask(sdk, stream=True, **kw))
        content, calls, finish = streamed_calls(chunks)
        assert (content, finish) == ("", "tool_calls")
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        fragments = [p for c in chunks if c.choices for p in c.choices[0].delta.tool_calls or [] if p.id is None]
        assert len(fragments) > 3 * len(calls)  # each call's arguments came in pieces, as they were written


def test_the_older_functions_api_answers_with_function_call(sdk):
    functions = [t["function"] for t in TOOLS]
    reply = sdk.chat.completions.create(model=BASE, messages=USER, functions=functions,
                                        function_call={"name": "add"}, max_tokens=200, temperature=1.0, seed=2)
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "add"
    jsonschema.validate(json.loads(choice.message.function_call.arguments), ADD)


# -- the tool loop: results render as in training --------------------------------------------------------------

def test_the_openai_tool_loop_renders_results_as_training_does(sdk, live):
    from tunesmith.data.tokenize import tokenize_chat

    first = ask(sdk, tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=0)
    call = first.choices[0].message.tool_calls[0]
    result = json.dumps({"city": json.loads(call.function.arguments)["city"], "temperature": 21})  # "run" it
    messages = [*USER, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": result}]
    final = ask(sdk, messages=messages, tool_choice="none", max_tokens=8, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.tool_calls is None
    prompt = live.seen[-1].ids
    # Training's rendering of the same conversation with a final answer: the server's prompt is its start,
    # and the answer follows it.
    record = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": result}, {"role": "assistant", "content": "Sunny."}]
    trained = tokenize_chat(live.engine.tokenizer, record, tools=TOOLS)
    assert trained.input_ids[:len(prompt)] == prompt
    answer = [t for t in trained.labels[len(prompt):] if t >= 0]  # what training learns after the prompt
    assert live.engine.tokenizer.decode(answer) == "Sunny.<|im_end|>"
    text = live.engine.tokenizer.decode(prompt)
    assert f"<|im_start|>tool\n{result}<|im_end|>" in text
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_call>' in text


def test_tool_choice_none_keeps_the_definitions_in_the_prompt_and_parses_nothing(sdk, live, monkeypatch):
    ask(sdk, tool_choice="none", max_tokens=2)
    with_tools = live.seen[-1].ids
    ask(sdk, tools=None, max_tokens=2)
    assert len(with_tools) > len(live.seen[-1].ids) + 500
    script(monkeypatch, live, [CALL])
    reply = ask(sdk, tool_choice="none")
    assert reply.choices[0].message.content == CALL and reply.choices[0].finish_reason == "stop"


# -- under auto the model decides: scripted replies ------------------------------------------------------------

def script(monkeypatch, live, pieces: list[str], finish: str = "stop"):
    """Make the engine answer every request with `pieces` (one event each), as a model that wrote them would."""
    from tunesmith.generation import Event

    def answer(requests):
        live.seen.extend(requests)
        for req in requests:
            for piece in pieces:
                req.emit(Event(req.index, piece))
            req.emit(Event(req.index, finish_reason=finish, prompt_tokens=len(req.ids), completion_tokens=len(pieces)))
    monkeypatch.setattr(live.engine, "submit", answer)


def pieces_of(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


UNPARSABLE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'
AUTO = [  # (reply, content, [(name, arguments)], finish_reason, the calls' chunks streamed before the end)
    (CALL, None, [("get_weather", '{"city": "Paris"}')], "tool_calls", None),
    ("Let me look.\n" + CALL, "Let me look.", [("get_weather", '{"city": "Paris"}')], "tool_calls", None),
    (CALL + "\n" + CALL.replace("Paris", "Rome"), None,
     [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')], "tool_calls", None),
    ("It is <b>sunny</b> < 3 > 2.", "It is <b>sunny</b> < 3 > 2.", [], "stop", None),
    # Unparsable: content, as the non-streamed reply; its call streamed up to where it stopped being JSON.
    (UNPARSABLE, UNPARSABLE, [], "stop", [("get_weather", '{"city": ')]),
    ("Checking <tool_call>\n{\"name\": \"add\"", "Checking <tool_call>\n{\"name\": \"add\"", [], "stop",
     []),  # cut off before its arguments: nothing of it streamed
]


@pytest.mark.parametrize("reply, content, calls, finish, partial", AUTO)
def test_auto_replies_become_tool_calls_streamed_or_not(sdk, live, monkeypatch, reply, content, calls, finish,
                                                        partial):
    script(monkeypatch, live, pieces_of(reply))
    whole = ask(sdk).choices[0]
    assert (whole.message.content, whole.finish_reason) == (content, finish)
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []] == calls
    chunks = list(ask(sdk, stream=True))
    got, streamed, end = streamed_calls(chunks)
    assert (got or None, end) == (content, finish)
    assert [(c["name"], c["arguments"]) for c in streamed] == (calls if partial is None else partial)
    if calls:  # markup never streams as content, not even its first characters
        assert all("<" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_auto_without_parallel_calls_keeps_the_first(sdk, live, monkeypatch):
    script(monkeypatch, live, [CALL + "\n" + CALL.replace("Paris", "Rome")])
    calls = ask(sdk, parallel_tool_calls=False).choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris"]


def test_a_conversation_stores_and_replays_tool_turns(sdk, live, monkeypatch):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    cid = httpx.post(f"{live.url}/v1/conversations", json={}, headers=headers).json()["id"]
    script(monkeypatch, live, [CALL])
    first = ask(sdk, extra_body={"conversation": cid}, extra_headers={"Idempotency-Key": "k1"}).choices[0]
    call = first.message.tool_calls[0]
    again = ask(sdk, extra_body={"conversation": cid}, extra_headers={"Idempotency-Key": "k1"}).choices[0]
    assert again.message.tool_calls[0].id == call.id and again.finish_reason == "tool_calls"  # replayed
    script(monkeypatch, live, ["It is sunny."])
    result = {"role": "tool", "tool_call_id": call.id, "content": "21 C"}
    final = ask(sdk, messages=[result], extra_body={"conversation": cid}).choices[0]
    assert final.message.content == "It is sunny."
    stored = httpx.get(f"{live.url}/v1/conversations/{cid}/messages", headers=headers).json()["data"]
    assert [(m["role"], m["content"], m.get("tool_calls"), m.get("tool_call_id")) for m in stored] == [
        ("user", USER[0]["content"], None, None),
        ("assistant", None, [call.model_dump(exclude_none=True)], None),
        ("tool", "21 C", None, call.id), ("assistant", "It is sunny.", None, None)]
    # The second turn's prompt is the whole exchange, rendered as the client's own history would be.
    direct = live.seen[-1].ids
    monkeypatch.undo()  # the model again
    ask(sdk, messages=[*USER, {"role": "assistant", "content": None,
                               "tool_calls": [call.model_dump(exclude_none=True)]}, result], max_tokens=2)
    assert live.seen[-1].ids == direct


def test_models_say_which_runs_were_trained_with_tools(sdk):
    listed = sdk.models.list().model_dump()["data"]
    assert [(m["id"], m["tools"]) for m in listed] == [(BASE, {"mode": "convention", "style": "hermes"})]


# -- LangChain, unchanged ---------------------------------------------------------------------------------------

def test_langchain_bind_tools_and_structured_output(live):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, ConfigDict, Field

    class Weather(BaseModel):
        """The weather in a city."""

        model_config = ConfigDict(extra="forbid")
        city: str = Field(max_length=10)

    llm = ChatOpenAI(model=BASE, base_url=live.url + "/v1", api_key=KEY, temperature=1.0, max_tokens=200, seed=4,
                     max_retries=0)
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Paris?")
    assert [c["name"] for c in message.tool_calls] == ["Weather"] and message.tool_calls[0]["id"].startswith("call_")
    assert len(message.tool_calls[0]["args"]["city"]) <= 10 and message.response_metadata["finish_reason"] == \
        "tool_calls"
    for method in ("function_calling", "json_schema"):
        found = llm.with_structured_output(Weather, method=method).invoke("Weather in Paris?")
        assert isinstance(found, Weather) and len(found.city) <= 10


# -- Llama 3.1's JSON calls, and a run's recorded style ---------------------------------------------------------

JSON_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


@pytest.mark.parametrize("reply, content, calls", [
    (JSON_CALL, None, [("get_weather", '{"city": "Paris"}')]),
    ("<|python_tag|>" + JSON_CALL, None, [("get_weather", '{"city": "Paris"}')]),
    (" Hello {there}", " Hello {there}", []),
    ('{"name": "get_weather", "parameters": ', '{"name": "get_weather", "parameters": ', []),  # cut off
])
def test_json_style_calls_stream_as_they_answer(reply, content, calls):
    from tunesmith.serve.tools import ToolPlan

    plan = ToolPlan(TOOLS, "auto", style="json")
    fed, done = feed(plan, pieces_of(reply, 2))
    whole = plan.finish(reply, "stop")
    assert (whole.message["content"], whole.reason) == (content, "tool_calls" if calls else "stop")
    assert ("".join(d.get("content", "") for _, d in fed) or None) == content
    if calls:  # nothing of a call goes out as content, and its arguments go out before the end
        assert all("content" not in d for _, d in fed) and joined(fed, before_end=True) == [a for _, a in calls]
    for message in (whole.message, done.message):
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])] == calls
    if reply.startswith(" Hello"):
        assert plan.stream().feed(" He") == [{"content": " He"}]  # plain text goes out once it cannot be a call


def test_a_run_is_read_in_the_style_it_was_trained_with():
    from types import SimpleNamespace

    from conftest import SMOLLM2_TEMPLATE
    from tunesmith.serve.tools import ToolPlan

    body = SimpleNamespace(functions_of_tools=[], choice="auto", parallel_tool_calls=None, legacy=False)
    assert ToolPlan.of(body, SMOLLM2_TEMPLATE).style == "hermes"  # the convention's, for a template without tools
    assert ToolPlan.of(body, SMOLLM2_TEMPLATE, {"mode": "native", "style": "json"}).style == "json"


def test_the_prompt_has_the_tools_as_the_client_sent_them(sdk, live):
    """Key order and all: the definitions render as the same entries would in a training file."""
    from tunesmith.data.tokenize import encode_chat_prompt

    reordered = [{"type": "function", "function": {"parameters": ADD, "name": "add", "description": "Add."}}]
    ask(sdk, tools=reordered, tool_choice="none", max_tokens=2)
    assert live.seen[-1].ids == encode_chat_prompt(live.engine.tokenizer, USER, tools=reordered)


# -- streaming: argument fragments as the model writes them -----------------------------------------------------

def tokens(text: str) -> list[str]:
    """`text` in pieces as small as a tokenizer's: words, runs of blank space, single punctuation marks."""
    import re

    return re.findall(r" ?\w+|\s+|[^\w\s]", text)


def feed(plan, pieces: list[str], finish: str = "stop"):
    """Stream `pieces` one at a time: ([(piece fed, delta that came out)], with None for the end's), Finished."""
    stream, out = plan.stream(), []
    for piece in pieces:
        out += [(piece, delta) for delta in stream.feed(piece)]
    deltas, done = stream.end(finish)
    return out + [(None, delta) for delta in deltas], done


def joined(fed, before_end: bool = False) -> list[str]:
    """Each streamed call's argument fragments put together (only those fed before the end, if asked)."""
    calls: dict[int, str] = {}
    for piece, delta in fed:
        for part in delta.get("tool_calls", []):
            if piece is not None or not before_end:
                calls[part["index"]] = calls.get(part["index"], "") + part["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


def first(index: int, name: str, id: str) -> dict:
    return {"tool_calls": [{"index": index, "id": id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


def part(index: int, arguments: str) -> dict:
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}


def test_a_call_streams_its_arguments_token_by_token_before_the_closing_tag():
    from tunesmith.serve.tools import ToolPlan

    plan = ToolPlan(TOOLS, "auto")
    fed, done = feed(plan, tokens(CALL))
    (call,) = done.message["tool_calls"]
    # The first chunk comes with the arguments' "{", then each token of the object as it is fed; nothing after
    # its "}" (the call's own "}", the newline, the closing tag), nothing at the end.
    assert fed == [("{", first(0, "get_weather", call["id"])), ("{", part(0, "{")), ('"', part(0, '"')),
                   ("city", part(0, "city")), ('"', part(0, '"')), (":", part(0, ":")), (" ", part(0, " ")),
                   ('"', part(0, '"')), ("Paris", part(0, "Paris")), ('"', part(0, '"')), ("}", part(0, "}"))]
    assert tokens(CALL)[-5:] == ["\n", "<", "/", "tool_call", ">"]  # fed after every fragment above
    assert (done.reason, done.message["content"]) == ("tool_calls", None)
    assert joined(fed) == [call["function"]["arguments"]] == \
        [plan.finish(CALL, "stop").message["tool_calls"][0]["function"]["arguments"]] == ['{"city": "Paris"}']


def test_content_then_parallel_calls_stream_in_order():
    from tunesmith.serve.tools import ToolPlan

    reply = "Let me look.\n" + CALL + "\n" + CALL.replace("Paris", "Rome")
    plan = ToolPlan(TOOLS, "auto")
    fed, done = feed(plan, tokens(reply))
    paris, rome = done.message["tool_calls"]
    calls = [d for _, d in fed if "tool_calls" in d]
    assert [d["tool_calls"][0]["index"] for d in calls] == [0] * 11 + [1] * 11  # call 1 after call 0, whole
    assert calls[0] == first(0, "get_weather", paris["id"]) and calls[11] == first(1, "get_weather", rome["id"])
    # The text before the first call streams first, without the blank space before the tag; no markup.
    assert [(p, d) for p, d in fed if "content" in d] == [("Let", {"content": "Let"}), (" me", {"content": " me"}),
                                                         (" look", {"content": " look"}), (".", {"content": "."})]
    assert fed.index((".", {"content": "."})) < fed.index(("{", calls[0]))
    assert (done.reason, done.message["content"]) == ("tool_calls", "Let me look.")
    assert joined(fed, before_end=True) == [c["function"]["arguments"] for c in
                                            plan.finish(reply, "stop").message["tool_calls"]] == \
        ['{"city": "Paris"}', '{"city": "Rome"}']


def test_a_call_waits_for_its_name_and_text_after_the_calls_comes_at_the_end():
    from tunesmith.serve.tools import ToolPlan

    reply = '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>\nDone.'
    fed, done = feed(ToolPlan(TOOLS, "auto"), tokens(reply))
    call = done.message["tool_calls"][0]
    assert fed == [('"', first(0, "get_weather", call["id"])), ('"', part(0, '{"city": "Paris"}')),
                   (None, {"content": "Done."})]
    assert (done.message["content"], call["function"]["arguments"]) == ("Done.", '{"city": "Paris"}')


def test_without_parallel_calls_only_the_first_streams():
    from tunesmith.serve.tools import ToolPlan

    fed, done = feed(ToolPlan(TOOLS, "auto", parallel=False), tokens(CALL + "\n" + CALL.replace("Paris", "Rome")))
    assert {d["tool_calls"][0]["index"] for _, d in fed} == {0} and joined(fed) == ['{"city": "Paris"}']
    assert [c["id"] for c in done.message["tool_calls"]] == [fed[0][1]["tool_calls"][0]["id"]]


def test_json_style_arguments_are_the_models_own_text():
    """Llama 3.1's JSON call, with the python tag and json.dumps-foreign spacing and numbers: the fragments add up
    to the text the model wrote, which is the reply's arguments; they read back as parse_reply's."""
    from tunesmith.data.tools import parse_reply
    from tunesmith.serve.tools import ToolPlan

    arguments = '{"city":"Paris","days":[1, 2.50],"note":"caf\\u00e9 \\"ok\\""}'
    reply = '<|python_tag|>{"name": "get_weather", "parameters": ' + arguments + "}"
    plan = ToolPlan(TOOLS, "required", style="json")
    fed, done = feed(plan, tokens(reply))
    assert fed[0] == ("{", first(0, "get_weather", done.message["tool_calls"][0]["id"]))
    assert all(piece is not None for piece, _ in fed)  # nothing left for the end
    assert joined(fed) == [arguments] == [c["function"]["arguments"] for c in plan.finish(reply, "stop").message[
        "tool_calls"]]
    evaluated = parse_reply(reply, "json")[1][0]["function"]["arguments"]  # evaluation's, unchanged
    assert evaluated == '{"city": "Paris", "days": [1, 2.5], "note": "café \\"ok\\""}'
    assert json.loads(evaluated) == json.loads(arguments)


def test_a_call_that_stops_parsing_under_auto_ends_as_content():
    """The rule: a call streams while its text can be a call; if the finished reply does not parse, the rest of
    the text follows as content (all the content adds up to the non-streamed reply's), with its finish_reason."""
    from tunesmith.serve.tools import ToolPlan

    plan = ToolPlan(TOOLS, "auto")
    cut = CALL[:CALL.index("ris")]  # max_tokens ran out inside the arguments
    for reply, finish, streamed in [(UNPARSABLE, "stop", '{"city": '), (cut, "length", '{"city": "Pa')]:
        fed, done = feed(plan, tokens(reply), finish)
        assert fed[0][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
        assert joined(fed) == [streamed]
        assert fed[-1] == (None, {"content": reply}) and "content" not in str(fed[:-1])
        assert (done.reason, done.message) == (finish, {"role": "assistant", "content": reply})
        assert plan.finish(reply, finish).message == done.message


def test_a_call_whose_later_arguments_override_the_streamed_ones_is_content():
    """json.loads keeps the last of a repeated key; the first already streamed, so the server cannot answer with
    the second: the reply is content (evaluation's parse_reply still reads the second)."""
    from tunesmith.data.tools import parse_reply
    from tunesmith.serve.tools import ToolPlan

    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}, "arguments": {"city": "Rome"}}' \
            '\n</tool_call>'
    plan = ToolPlan(TOOLS, "auto")
    fed, done = feed(plan, tokens(reply))
    assert joined(fed) == ['{"city": "Paris"}'] and (done.reason, done.message["content"]) == ("stop", reply)
    assert plan.finish(reply, "stop").message == {"role": "assistant", "content": reply}
    assert parse_reply(reply)[1][0]["function"]["arguments"] == '{"city": "Rome"}'


def test_arguments_written_as_a_string_go_out_whole_at_the_end_and_hold_later_calls():
    from tunesmith.serve.tools import ToolPlan

    quoted = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>'
    reply = quoted + "\n" + CALL
    fed, done = feed(ToolPlan(TOOLS, "auto"), tokens(reply))
    oslo, paris = done.message["tool_calls"]
    assert fed == [(None, first(0, "get_weather", oslo["id"])), (None, part(0, '{"city": "Oslo"}')),
                   (None, first(1, "get_weather", paris["id"])), (None, part(1, '{"city": "Paris"}'))]


def test_the_older_function_call_streams_its_arguments_too():
    from tunesmith.serve.tools import ToolPlan

    plan = ToolPlan(TOOLS, "get_weather", parallel=False, legacy=True)
    fed, done = feed(plan, tokens(CALL))
    assert [d for _, d in fed][:3] == [{"function_call": {"name": "get_weather", "arguments": ""}},
                                       {"function_call": {"arguments": "{"}},
                                       {"function_call": {"arguments": '"'}}]
    assert all(piece is not None and set(d) == {"function_call"} for piece, d in fed)
    assert "".join(d["function_call"]["arguments"] for _, d in fed) == done.message["function_call"]["arguments"] \
        == '{"city": "Paris"}'
    assert done.reason == "function_call"

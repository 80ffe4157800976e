"""The server under hostile or unusual input: what OpenAI accepts is accepted, one request never fails or
freezes the others, the queue bound holds, client mistakes are 4xx envelopes (never a 500 or a traceback),
conversations keep their system message, the API key covers every route, idempotency keys are honest, and
types are as strict as OpenAI's. Mostly in-process through the app factory; a real uvicorn on 127.0.0.1
where the transport matters (a client hanging up, a request in flight while /health is asked)."""

from __future__ import annotations

import importlib
import json
import logging
import queue
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from serve_assets import CONTEXT, uvicorn_on_loopback, write_base

BASE = "base"
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def base_engine(bpe, tmp_path_factory):
    from tunesmith.serve import load_engine

    engine = load_engine(str(write_base(bpe, tmp_path_factory.mktemp("robust") / "base")))
    engine.models = {BASE: next(iter(engine.models.values()))}
    yield engine
    engine.stop()


def fresh(base_engine, **options):
    """An engine of its own (own queue and worker) over the already loaded tiny model."""
    from tunesmith.serve import Engine

    return Engine(base_engine.models, base_engine.tokenizer, context_window=CONTEXT, **options)


@contextmanager
def client_for(engine, **settings):
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app

    with TestClient(create_app(engine, ServeSettings(**settings))) as c:
        yield c
    engine.stop()


@pytest.fixture(scope="module")
def client(base_engine):
    with client_for(base_engine) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": BASE, "messages": USER, "max_tokens": 6,
                                                     "temperature": 0, **body})


def text_of(response) -> str:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def assert_envelope(response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def spy_submit(engine, monkeypatch) -> list:
    """The engine requests submitted from now on."""
    seen, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda requests: (seen.extend(requests), submit(requests))[1])
    return seen


# -- a real server on 127.0.0.1, in this process (so tests can gate its internals) ----------------------------

class Watch:
    """ASGI wrapper that records every exception escaping the app (what uvicorn logs as a traceback) and
    reports each finished HTTP request on `done`."""

    def __init__(self, app):
        self.app, self.errors, self.done = app, [], queue.Queue()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        except BaseException as err:
            self.errors.append(err)
            raise
        finally:
            self.done.put(scope["path"])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextmanager
def live(engine, **settings):
    """(base url, Watch, log records) of a uvicorn server on a free loopback port."""
    from tunesmith.serve import ServeSettings, create_app

    app = Watch(create_app(engine, ServeSettings(**settings)))
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "asyncio")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with uvicorn_on_loopback(app) as url:
            yield url, app, records
    finally:
        for logger in loggers:
            logger.removeHandler(records)
        engine.stop()


def tracebacks(records) -> list[str]:
    return [r.getMessage() for r in records if r.exc_info or "Traceback" in r.getMessage()]


# -- 1. what OpenAI accepts is accepted ----------------------------------------------------------------------

IGNORED = [{"logit_bias": {}}, {"tools": []}, {"metadata": {"team": "a"}}, {"store": False}, {"store": True},
           {"service_tier": "auto"}, {"user": "user-1"}, {"parallel_tool_calls": True},
           {"response_format": {"type": "text"}},
           {"tool_choice": "none"}, {"tool_choice": "auto"}, {"functions": []}, {"function_call": "none"},
           {"modalities": ["text"]}, {"prediction": {"type": "content", "content": "Hello there"}},
           {"reasoning_effort": "low"}, {"prompt_cache_key": "k"}, {"safety_identifier": "s"},
           {"messages": [{"role": "user", "content": "Hello", "name": "ann"}]},
           {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi",
                                                               "refusal": None, "tool_calls": []},
                         {"role": "user", "content": "Hello"}]}]


@pytest.mark.parametrize("extra", IGNORED, ids=lambda e: next(iter(e)))
def test_fields_that_do_not_change_the_reply_are_accepted_and_ignored(client, extra):
    messages = extra.get("messages", USER)
    assert text_of(chat(client, **extra)) == text_of(chat(client, messages=messages))


@pytest.mark.parametrize("extra", [{"logit_bias": {}}, {"user": "u"}, {"best_of": 1}, {"suffix": ""},
                                   {"metadata": {"a": "b"}}, {"store": False}])
def test_completion_fields_that_do_not_change_the_reply_are_accepted(client, extra):
    body = {"model": BASE, "prompt": "Q: 2+2?", "max_tokens": 6, "temperature": 0}
    plain = client.post("/v1/completions", json=body)
    assert text_of(client.post("/v1/completions", json={**body, **extra})) == text_of(plain)


def test_the_official_client_with_its_usual_arguments(client):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{client.base_url}/v1", api_key="none", http_client=client, max_retries=0)
    reply = sdk.chat.completions.create(model=BASE, messages=USER, max_tokens=6, temperature=0, tools=[],
                                        logit_bias={}, metadata={"k": "v"}, store=False, user="u",
                                        parallel_tool_calls=False, service_tier="auto", tool_choice="none")
    assert reply.choices[0].message.content == text_of(chat(client))


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
    ("/v1/chat/completions", {"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0.type"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools.0.function.parameters"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}]}, "tools.0.function.parameters"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}] * 2},
     "tools.1.function.name"),
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": []}]}, "functions.0.parameters"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
     "messages.0.tool_calls.0.type"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "1"}]},
     "messages.1.tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "1",
                                                                                "tool_call_id": "call_9"}]},
     "messages.1.tool_call_id"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "and then"}, "suffix"),
    ("/v1/completions", {"logit_bias": {"five": -100}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"99999999": -100}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"9" * 5000: -100}}, "logit_bias"),  # past Python's int-string limit
    ("/v1/chat/completions", {"logit_bias": {"1" + "0" * 4300: 5}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"0" * 5000 + "1": 5, "x": 1}}, "logit_bias"),
])
def test_settings_that_would_change_the_reply_are_refused_by_name(client, path, extra, param):
    body = {"model": BASE, "max_tokens": 4, **({"messages": USER} if "chat" in path else {"prompt": "Hi"}), **extra}
    error = assert_envelope(client.post(path, json=body), 400, param)
    assert param.split(".")[-1] in error["message"]


# -- 2. one request must not fail everyone's -------------------------------------------------------------------

def _together(engine, specs: list[dict]) -> tuple[list[str], list[str | None]]:
    """Submit requests in one call (so they share a batch); their texts and errors."""
    from tunesmith.generation import prompt_ids
    from tunesmith.generation import Request

    done, texts, errors, lock = threading.Event(), {}, {}, threading.Lock()

    def emit(event):
        with lock:
            texts[event.index] = texts.get(event.index, "") + event.text
            if event.error:
                errors[event.index] = event.error
            if event.finish_reason or event.error:
                finished.add(event.index)
                if len(finished) == len(specs):
                    done.set()

    finished = set()
    requests = [Request(BASE, prompt_ids(engine.tokenizer, prompt=spec.pop("prompt", "Hello")), 6, emit, index=i,
                        **spec) for i, spec in enumerate(specs)]
    engine.submit(requests)
    assert done.wait(60)
    return [texts.get(i, "") for i in range(len(specs))], [errors.get(i) for i in range(len(specs))]


def test_values_that_cannot_sample_are_greedy_and_share_a_batch_with_others(base_engine, monkeypatch):
    sizes = []
    prefill = base_engine.decoder.prefill
    monkeypatch.setattr(base_engine.decoder, "prefill", lambda rows, chunk: (sizes.append(len(rows)),
                                                                              prefill(rows, chunk))[1])
    greedy, _ = _together(base_engine, [{"temperature": 0}])
    specs = [{"temperature": 1e-45}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-300},
             {"temperature": 0}, {"temperature": 1.0, "seed": 3}]
    texts, errors = _together(base_engine, specs)
    assert sizes[-1] == len(specs) and errors == [None] * len(specs)
    assert texts[:4] == greedy * 4


def test_a_row_that_fails_fails_alone(base_engine, monkeypatch):
    from tunesmith.generation import Row as _Row

    pick = _Row.pick

    def broken(self, logits):
        if self.req.seed == 666:
            raise RuntimeError("this row's sampling broke")
        return pick(self, logits)

    monkeypatch.setattr(_Row, "pick", broken)
    alone, _ = _together(base_engine, [{"temperature": 0, "prompt": "Q"}])
    texts, errors = _together(base_engine, [{"temperature": 0, "prompt": "Q"}, {"temperature": 1.0, "seed": 666},
                                            {"temperature": 0, "prompt": "Q"}])
    assert errors[0] is None and errors[2] is None and "sampling broke" in errors[1]
    assert texts[0] == texts[2] == alone[0]


@pytest.mark.parametrize("extra", [{"temperature": 1e-45}, {"temperature": 5e-324}, {"top_p": 1e-300}])
def test_tiny_sampling_values_over_http_answer_greedy(client, extra):
    assert text_of(chat(client, n=3, **{"temperature": 1.0, **extra})) == text_of(chat(client))


# -- 3. one request must not freeze the server ----------------------------------------------------------------

def test_a_prompt_far_over_the_window_is_refused_without_tokenizing(client, monkeypatch):
    app_module = importlib.import_module("tunesmith.serve.prompts")

    calls = []
    monkeypatch.setattr(app_module, "encode_chat_prompt", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(app_module, "prompt_ids", lambda *a, **k: calls.append(1))
    many = [{"role": "user", "content": "hi<|im_end|>"} for _ in range(8000)]
    error = assert_envelope(chat(client, messages=many), 400, "messages")
    assert error["code"] == "context_length_exceeded" and "at least" in error["message"]
    assert_envelope(client.post("/v1/completions", json={"model": BASE, "prompt": "hi " * 20_000}), 400, "prompt")
    assert calls == []


def test_health_answers_while_a_request_is_being_tokenized(base_engine, monkeypatch):
    """The tokenizer is held inside a request until /health has answered; tokenizing on the event loop
    would hold /health too, until the gate gives up (and the assertion below fails)."""
    app_module = importlib.import_module("tunesmith.serve.prompts")

    entered, release = threading.Event(), threading.Event()
    encode = app_module.encode_chat_prompt

    def held(*args, **kwargs):
        entered.set()
        release.wait(30)
        return encode(*args, **kwargs)

    monkeypatch.setattr(app_module, "encode_chat_prompt", held)
    monkeypatch.setattr(importlib.import_module("tunesmith.generation.api"), "encode_chat_prompt", held)
    many = [{"role": "user", "content": "hi<|im_end|>"} for _ in range(4)]
    with live(fresh(base_engine)) as (url, app, records), httpx.Client(base_url=url, timeout=60) as http:
        pending = {}
        worker = threading.Thread(target=lambda: pending.update(r=http.post("/v1/chat/completions", json={
            "model": BASE, "messages": many, "max_tokens": 4, "temperature": 0})))
        worker.start()
        assert entered.wait(30)
        health = httpx.get(f"{url}/health", timeout=20)
        answered_while_held = not release.is_set()
        release.set()
        worker.join(60)
        assert health.status_code == 200 and answered_while_held
        assert pending["r"].status_code == 200
        assert not app.errors and not tracebacks(records.records)


# -- 4. the queue bound is real --------------------------------------------------------------------------------

def test_at_most_max_queue_requests_wait_and_the_rest_get_429(base_engine):
    small = fresh(base_engine, max_queue=4, max_batch=1)
    running, release = threading.Event(), threading.Event()
    start = small._start

    def held(request):
        running.set()
        release.wait(60)
        return start(request)

    small._start = held
    with client_for(small) as c:
        results = queue.Queue()

        def send():
            results.put(chat(c))

        first = threading.Thread(target=send)
        first.start()
        assert running.wait(30)  # the first request is being generated; nothing waits yet
        waiting = [threading.Thread(target=send) for _ in range(4)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 30
        while small.stats()["queued"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        over = [chat(c) for _ in range(6)]  # answered at once: the queue is full
        peak = small.stats()["queued"]
        release.set()
        for t in [first, *waiting]:
            t.join(60)
    assert peak == 4
    for r in over:
        assert assert_envelope(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    assert [results.get().status_code for _ in range(5)] == [200] * 5


def test_the_bound_holds_between_batches_too(base_engine):
    """The old engine moved every waiting request into an unbounded list when it formed the next batch, so
    the queue looked empty again while they all still waited."""
    from tunesmith.generation import QueueFull, Request

    small = fresh(base_engine, max_queue=3, max_batch=1)
    entered, go, finished = queue.Queue(), threading.Semaphore(0), queue.Queue()
    start = small._start

    def held(request):  # each admitted request waits for its own `go`
        entered.put(request)
        go.acquire(timeout=60)
        return start(request)

    def emit(event):
        if event.finish_reason or event.error:
            finished.put(event)

    small._start = held
    request = lambda: Request(BASE, [1, 2, 3], 2, emit, temperature=0)  # noqa: E731
    small.submit([request()])
    entered.get(timeout=30)  # A runs
    small.submit([request() for _ in range(3)])  # B1, B2, B3 wait: full
    with pytest.raises(QueueFull):
        small.submit([request()])
    go.release()
    entered.get(timeout=30)  # A is done, B1 runs, B2 and B3 wait
    assert small.stats()["queued"] == 2
    small.submit([request()])
    with pytest.raises(QueueFull):
        small.submit([request()])
    for _ in range(5):
        go.release()
    assert all(finished.get(timeout=60).error is None for _ in range(5))
    small.stop()


# -- 5. client mistakes are 4xx, never 500 ----------------------------------------------------------------------

@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_a_400(client, depth):
    raw = '{"model": "base", "messages": ' + "[" * depth + "]" * depth + "}"
    assert_envelope(client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}),
                    400)
    assert chat(client).status_code == 200


@pytest.mark.parametrize("raw", [b'{"model": "base", "messages": [], "temperature": NaN}',
                                 b'{"model": "base", "messages": [], "temperature": Infinity}',
                                 b'{"model": "base", "prompt": "\xff\xfe"}'])
def test_bodies_that_are_not_json(client, raw):
    assert_envelope(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)


LONE = "\\ud800"  # the JSON escape of a lone surrogate: valid JSON, not valid Unicode


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", f'{{"model": "base", "prompt": "a{LONE}b"}}', "prompt"),
    ("/v1/completions", f'{{"model": "base", "prompt": ["ok", "{LONE}"]}}', "prompt.1"),
    ("/v1/chat/completions", f'{{"model": "base", "messages": [{{"role": "user", "content": "{LONE}"}}]}}',
     "messages.0.content"),
    ("/v1/chat/completions", f'{{"model": "{LONE}", "messages": [{{"role": "user", "content": "hi"}}]}}', "model"),
    ("/v1/chat/completions", f'{{"model": "base", "conversation": "{LONE}", "messages": '
                             '[{"role": "user", "content": "hi"}]}', "conversation"),
    ("/v1/conversations", f'{{"system": "{LONE}"}}', "system"),
    ("/v1/conversations", f'{{"metadata": {{"k": "{LONE}"}}}}', "metadata.k"),
    ("/v1/conversations", f'{{"metadata": {{"{LONE}": "v"}}}}', "metadata"),
])
def test_lone_surrogates_are_a_400_naming_the_field(client, path, raw, param):
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    error = assert_envelope(r, 400)
    assert error["code"] == "invalid_unicode"
    assert error["param"] == param
    assert chat(client).status_code == 200


def test_a_conversation_id_that_is_not_text(client):
    assert_envelope(client.get("/v1/conversations/%ED%A0%80"), 404)


def test_an_empty_completion_prompt_is_answered(client):
    for prompts in ("", ["", "Hello"]):
        r = client.post("/v1/completions", json={"model": BASE, "prompt": prompts, "max_tokens": 4,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["choices"]) == (1 if prompts == "" else 2)
        assert body["usage"]["completion_tokens"] >= len(body["choices"])


def test_a_client_that_hangs_up_mid_body_or_mid_stream_leaves_no_traceback(base_engine):
    engine = fresh(base_engine)
    with live(engine) as (url, app, records):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model\": \"ba")
        assert app.done.get(timeout=30) == "/v1/chat/completions"
        with httpx.Client(base_url=url, timeout=60) as http:
            body = {"model": BASE, "messages": USER, "max_tokens": 50, "temperature": 1.0, "stream": True}
            for _ in range(3):
                with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    next(response.iter_lines())  # generation is under way: hang up
                assert app.done.get(timeout=30) == "/v1/chat/completions"
            deadline = time.monotonic() + 30
            while http.get("/health").json()["running"]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            last = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            assert last.status_code == 200, (last.text, app.errors, [r.getMessage() for r in records.records])
    assert not app.errors and not tracebacks(records.records)


# -- 6. a conversation keeps its system message --------------------------------------------------------------

def test_a_system_message_sent_with_the_first_turn_stays_in_every_prompt(client, base_engine, monkeypatch):
    seen = spy_submit(base_engine, monkeypatch)
    cid = client.post("/v1/conversations", json={}).json()["id"]
    first = [{"role": "system", "content": "Answer like a pirate."}, {"role": "user", "content": "Hello"}]
    for messages in [first, [{"role": "user", "content": "And 2+2?"}], [{"role": "user", "content": "Thanks"}]]:
        assert chat(client, conversation=cid, messages=messages, max_tokens=3).status_code == 200
    for request in seen:
        prompt = base_engine.tokenizer.decode(request.ids)
        assert prompt.count("Answer like a pirate.") == 1
        assert "SmolLM" not in prompt  # the template's default system prompt is not injected instead
    assert "And 2+2?" in base_engine.tokenizer.decode(seen[-1].ids)


def test_a_pinned_system_message_survives_trimming(client, base_engine, monkeypatch):
    seen = spy_submit(base_engine, monkeypatch)
    cid = client.post("/v1/conversations", json={}).json()["id"]
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "number 0"}]
    assert chat(client, conversation=cid, messages=first, max_tokens=3).status_code == 200
    for i in range(1, 12):  # well past the 128-token window: old turns are dropped
        msg = [{"role": "user", "content": f"Review: great movie number {i}"}]
        assert chat(client, conversation=cid, messages=msg, max_tokens=3).status_code == 200
    prompt = base_engine.tokenizer.decode(seen[-1].ids)
    assert "Be brief." in prompt and "number 11" in prompt and "number 0" not in prompt


# -- 7. the API key covers everything; it need not be on the command line ----------------------------------------

def test_the_api_key_covers_the_docs_and_the_schema(base_engine):
    with client_for(fresh(base_engine), api_key="sekret") as c:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert_envelope(c.get(path), 404)
        assert_envelope(c.get("/openapi.json"), 401)
        schema = c.get("/openapi.json", headers={"Authorization": "Bearer sekret"})
        assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    with client_for(fresh(base_engine)) as c:  # without a key nothing changes
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200


def test_resolve_api_key(tmp_path):
    from tunesmith.serve import ServeError, resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {"TUNESMITH_API_KEY": "from-env"}
    assert resolve_api_key(None, None, {}) is None
    assert resolve_api_key("given", None, env) == "given"
    assert resolve_api_key(None, key_file, env) == "from-file"
    assert resolve_api_key(None, None, env) == "from-env"
    with pytest.raises(ServeError, match="not both"):
        resolve_api_key("given", key_file, {})
    with pytest.raises(ServeError, match="missing"):
        resolve_api_key(None, tmp_path / "missing", {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ServeError, match="empty"):
        resolve_api_key(None, tmp_path / "empty", {})
    with pytest.raises(ServeError, match="TUNESMITH_API_KEY is empty"):
        resolve_api_key(None, None, {"TUNESMITH_API_KEY": ""})
    with pytest.raises(ServeError, match="ASCII"):
        resolve_api_key("two words", None, {})


# -- 8. idempotency keys ---------------------------------------------------------------------------------------

def test_the_same_key_with_another_body_is_refused(client):
    cid = client.post("/v1/conversations", json={}).json()["id"]
    key = {"Idempotency-Key": "k-1"}
    first = client.post("/v1/chat/completions", headers=key, json={
        "model": BASE, "conversation": cid, "messages": USER, "max_tokens": 4, "temperature": 0})
    assert first.status_code == 200
    other = client.post("/v1/chat/completions", headers=key, json={
        "model": BASE, "conversation": cid, "messages": [{"role": "user", "content": "Something else"}],
        "max_tokens": 4, "temperature": 0})
    assert assert_envelope(other, 422)["code"] == "idempotency_key_reused"
    retry = client.post("/v1/chat/completions", headers=key, json={
        "model": BASE, "conversation": cid, "messages": USER, "max_tokens": 4, "temperature": 0, "stream": True})
    streamed = [json.loads(line[6:]) for line in retry.text.split("\n\n") if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == text_of(first)
    assert len(client.get(f"/v1/conversations/{cid}/messages").json()["data"]) == 2


def test_concurrent_requests_with_one_key_generate_once(base_engine, monkeypatch):
    engine = fresh(base_engine)
    submitted, second_submitted = [], threading.Event()
    submit = engine.submit

    def counting(requests):
        submitted.append(requests)
        if len(submitted) == 2:
            second_submitted.set()
        submit(requests)

    start = engine._start

    def slow(request):  # the first generation lasts until a second one starts, or 2 s (the second waits)
        second_submitted.wait(2)
        return start(request)

    monkeypatch.setattr(engine, "submit", counting)
    monkeypatch.setattr(engine, "_start", slow)
    with client_for(engine) as c:
        cid = c.post("/v1/conversations", json={}).json()["id"]
        body = {"model": BASE, "conversation": cid, "messages": USER, "max_tokens": 4, "temperature": 1.0}
        replies = queue.Queue()
        threads = [threading.Thread(target=lambda: replies.put(c.post(
            "/v1/chat/completions", json=body, headers={"Idempotency-Key": "same"}))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        texts = [text_of(replies.get()) for _ in range(2)]
        stored = c.get(f"/v1/conversations/{cid}/messages").json()["data"]
    assert len(submitted) == 1
    assert texts[0] == texts[1] == stored[1]["content"] and len(stored) == 2


# -- 9. strict types and a default reply length ------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [({"temperature": True}, "temperature"), ({"max_tokens": "10"}, "max_tokens"),
                                          ({"n": 1.0}, "n"), ({"stream": "false"}, "stream"),
                                          ({"top_p": "1"}, "top_p"), ({"seed": 1.5}, "seed"),
                                          ({"logprobs": 1}, "logprobs")])
def test_types_are_strict(client, extra, param):
    assert_envelope(chat(client, **extra), 400, param)


def test_integers_are_valid_floats(client):
    assert text_of(chat(client, temperature=0, top_p=1, presence_penalty=0)) == text_of(chat(client))


def test_chat_without_max_tokens_gets_a_bounded_default(base_engine, monkeypatch):
    from tunesmith.serve import ServeSettings

    assert ServeSettings().chat_max_tokens == 1024
    seen = spy_submit(base_engine, monkeypatch)
    with client_for(fresh(base_engine), chat_max_tokens=5) as c:
        r = c.post("/v1/chat/completions", json={"model": BASE, "messages": USER})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
    with client_for(base_engine) as c:
        assert c.post("/v1/chat/completions", json={"model": BASE, "messages": USER}).status_code == 200
    assert seen[-1].max_tokens == min(1024, CONTEXT - len(seen[-1].ids))


def test_content_that_could_forge_a_role_under_a_rewriting_template_is_a_400(base_engine):
    """A template that changes content (here: upper-cases it) cannot be aligned with it, so content holding a
    special-token string is refused (MaskError in tokenize) rather than encoded with a forged control token."""
    from tunesmith.serve import Engine

    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper + "
                "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    engine = Engine(base_engine.models, base_engine.tokenizer, context_window=CONTEXT, chat_template=template)
    with client_for(engine) as c:
        assert text_of(chat(c)) is not None  # plain content renders fine under this template
        assert_envelope(chat(c, messages=[{"role": "user", "content": "hi <|im_end|>"}]), 400, "messages")


@pytest.mark.parametrize("extra, param, says", [
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"seed": 2**63}, "seed", "less than or equal to 9223372036854775807"),
    ({"seed": -2**63 - 1}, "seed", "greater than or equal to"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 items"),
    ({"stop": ["a", 5]}, "stop.1", "valid string"),
])
def test_what_openai_refuses_is_refused_with_the_reason(client, extra, param, says):
    """Each refusal names the field and says what is wrong with what was sent (for a union such as `stop`,
    the branch matching the JSON type sent, not pydantic's first branch)."""
    error = assert_envelope(chat(client, **extra), 400, param)
    assert says in error["message"], error


def test_every_invalid_field_is_reported(client):
    error = assert_envelope(chat(client, temperature=True, max_tokens="10"), 400, "temperature")
    assert "temperature:" in error["message"] and "max_tokens:" in error["message"]


def test_stream_options_with_stream_and_int64_seeds_are_accepted(client):
    assert chat(client, seed=2**63 - 1).status_code == 200
    assert chat(client, seed=-2**63).status_code == 200
    with client.stream("POST", "/v1/chat/completions", json={
            "model": BASE, "messages": USER, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert "usage" in "".join(response.iter_text())


# -- OpenAI fields honoured: response_format, token-id prompts, echo + logprobs, max_tokens 0 -----------------

SCHEMA = {"type": "object", "properties": {"intent": {"enum": ["refund", "shipping"]},
                                           "order": {"type": "integer", "minimum": 0}},
          "required": ["intent", "order"], "additionalProperties": False}


def closing_bias(tokenizer) -> dict[str, float]:
    """A random model almost never closes a string or an object; a bias toward the closing characters lets
    replies finish inside the token budget (the grammar alone still decides what is legal)."""
    return {str(tokenizer.convert_tokens_to_ids(t)): 4.0 for t in ('"', "}", "]", "0")}


def finished(reply) -> str:
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    return choice["message"]["content"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_modes_always_parse_and_follow_the_schema(client, base_engine, seed):
    """Constrained decoding: the tiny random model would never write JSON on its own."""
    bias = closing_bias(base_engine.tokenizer)
    reply = chat(client, max_tokens=64, temperature=1.0, seed=seed, logit_bias=bias,
                 response_format={"type": "json_object"})
    assert isinstance(json.loads(finished(reply)), dict)
    reply = chat(client, max_tokens=64, temperature=1.0, seed=seed, logit_bias=bias, response_format={
        "type": "json_schema", "json_schema": {"name": "route", "schema": SCHEMA, "strict": True}})
    value = json.loads(finished(reply))
    assert set(value) == {"intent", "order"} and value["intent"] in ("refund", "shipping")
    assert isinstance(value["order"], int) and value["order"] >= 0


def test_an_invalid_schema_is_a_400_naming_response_format(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}
    assert_envelope(chat(client, response_format=bad), 400, "response_format")


LOOP = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}  # a $ref to itself: no first character
BRANCHES = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"const": i}}, "required": [f"k{i}"]}
                      for i in range(2500)]}  # over llguidance's 2,000 items of a row, found once a key starts
LONG = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a{100000}$"}}, "required": ["a"]}


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "probe", "schema": schema}}


def test_a_schema_the_grammar_cannot_start_is_a_400_naming_response_format(client):
    error = assert_envelope(chat(client, response_format=json_schema(LOOP)), 400, "response_format")
    assert error["message"].startswith("response_format cannot be enforced: ") and "\n" not in error["message"]


@pytest.mark.parametrize("schema", [BRANCHES, LONG], ids=["anyOf", "pattern"])
def test_a_grammar_limit_met_mid_reply_ends_it_saying_so(client, base_engine, schema):
    """llguidance's limits (items per row, lexer size) show only as the reply goes: the reply ends there with
    finish_reason "grammar_error", never "stop" with JSON that does not validate, streamed or not."""
    body = {"max_tokens": 60, "temperature": 1.0, "seed": 0, "logit_bias": closing_bias(base_engine.tokenizer),
            "response_format": json_schema(schema)}
    reply = chat(client, **body)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "grammar_error", choice
    with client.stream("POST", "/v1/chat/completions", json={"model": BASE, "messages": USER, "stream": True,
                                                             **body}) as streamed:
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "grammar_error"


def test_token_id_prompts_equal_their_text(client, base_engine):
    ids = base_engine.tokenizer("What is the capital of France?", add_special_tokens=False)["input_ids"]
    as_text = client.post("/v1/completions", json={"model": BASE, "prompt": "What is the capital of France?",
                                                   "max_tokens": 6, "temperature": 0}).json()
    as_ids = client.post("/v1/completions", json={"model": BASE, "prompt": [ids, ids], "max_tokens": 6,
                                                  "temperature": 0}).json()
    assert [c["text"] for c in as_ids["choices"]] == [as_text["choices"][0]["text"]] * 2
    assert as_ids["usage"]["prompt_tokens"] == 2 * len(ids)
    assert_envelope(client.post("/v1/completions", json={"model": BASE, "prompt": [10**7]}), 400, "prompt")


@pytest.mark.parametrize("prompt, param, message", [
    ([1, -1, 2], "prompt.1", "prompt.1: Input should be greater than or equal to 0"),
    ([1, "a"], "prompt.1", "prompt.1: Input should be a valid integer"),
    (["a", 3], "prompt.1", "prompt.1: Input should be a valid string"),
    ([[1, 2], [3, -4]], "prompt.1.1", "prompt.1.1: Input should be greater than or equal to 0"),
    ([[1, "x"]], "prompt.0.1", "prompt.0.1: Input should be a valid integer"),
    ([[]], "prompt.0", "prompt.0: List should have at least 1 item after validation, not 0"),
    ([], "prompt", "prompt: List should have at least 1 item after validation, not 0"),
])
def test_a_bad_prompt_is_refused_for_its_one_problem(client, prompt, param, message):
    """A prompt is a string, strings, token ids or lists of token ids: the error is the one problem of the
    form the client sent (the branch of the union that got furthest), not every branch's complaint."""
    error = assert_envelope(client.post("/v1/completions", json={"model": BASE, "prompt": prompt}), 400, param)
    assert error["message"] == message


def test_echo_with_logprobs_scores_the_prompt_like_a_forward_pass(client, base_engine):
    """OpenAI's shape (first token null, then each prompt token's logprob and top alternatives), equal to the
    log-softmax of one forward pass; max_tokens 0 returns the prompt alone."""
    import torch

    text = "What is the capital of France? Paris"
    ids = base_engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    reply = client.post("/v1/completions", json={"model": BASE, "prompt": text, "max_tokens": 0, "echo": True,
                                                  "logprobs": 2}).json()
    choice = reply["choices"][0]
    assert choice["text"] == text and reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                                         "total_tokens": len(ids),
                                                         "prompt_tokens_details": {"cached_tokens": 0}}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    model = next(iter(base_engine.models.values())).module
    with torch.inference_mode():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        top = lp["top_logprobs"][i]  # the 2 most likely, and the token itself (OpenAI: up to logprobs + 1)
        assert len(top) in (2, 3) and top[lp["tokens"][i]] == lp["token_logprobs"][i]
        assert max(top.values()) == pytest.approx(float(expected[i - 1].max()), abs=1e-4)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]


def test_a_tool_definition_is_refused_in_the_same_words_as_data_validate_says(client):
    """One check of a tool definition: the server's 400 says what `data validate` says of the same parameters."""
    from tunesmith.data.toolcheck import parameters_problems

    parameters = {"type": "object", "properties": {"a": {"type": "nonsense"}}}
    body = {"model": BASE, "max_tokens": 4, "messages": USER,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]}
    error = assert_envelope(client.post("/v1/chat/completions", json=body), 400, "tools.0.function.parameters")
    [(field, why)] = parameters_problems(parameters, "tools.0.function.parameters")
    assert field == "tools.0.function.parameters.properties.a.type"
    assert error["message"] == f"{field}: {why}."
    assert why.startswith("parameters is not a valid JSON schema: 'nonsense' is not valid under any of the given")


# -- 10. the runs browser reads only what lies inside --runs, and never hangs on it ------------------------------

SECRET_FILES = {"run.json": json.dumps({"task": "sft", "base_model": "SECRET", "method": "SECRET", "peft": False}),
                "metrics.json": json.dumps({"after": {"SECRET": 1.0}}), "log.jsonl": '{"step": 1, "SECRET": 1}\n',
                "train_config.yaml": "SECRET: 1\n", "report.html": "<h1>SECRET</h1>", "report.json": '{"title": "SECRET"}'}


def test_the_runs_browser_follows_no_link_out_of_runs(base_engine, tmp_path):
    """Directories linked out of --runs were never walked; files linked out (run.json, report.html, ...) are
    not read either, while a file linked to another inside --runs still is."""
    outside, runs = tmp_path / "outside", tmp_path / "runs"
    outside.mkdir()
    for name, text in SECRET_FILES.items():
        (outside / name).write_text(text)
    for directory, names in {"run": ["run.json", "metrics.json", "log.jsonl", "train_config.yaml"],
                             "report": ["report.html", "report.json"]}.items():
        (runs / directory).mkdir(parents=True)
        for name in names:
            (runs / directory / name).symlink_to(outside / name)
    (runs / "kept").mkdir()
    (runs / "kept" / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (runs / "kept" / "train_config.yaml").symlink_to(runs / "kept" / "log.jsonl")  # inside: still read
    with client_for(fresh(base_engine), runs=str(runs)) as c:
        answers = [c.get(path) for path in ("/v1/runs", "/v1/runs/run", "/v1/reports", "/v1/runs/kept")]
        assert [r.status_code for r in answers] == [200] * 4
        assert all("SECRET" not in r.text for r in answers), [r.text for r in answers]
        run = answers[1].json()
        assert (run["status"], run["config"], run["log"], run["after"]) == ("unfinished", None, [], {})
        assert [r["title"] for r in answers[2].json()["data"]] == ["report"]
        assert_envelope(c.get("/v1/reports/report"), 404)
        assert answers[3].json()["config"] == '{"step": 1, "loss": 2.0}\n'


@contextmanager
def fifos(paths):
    """Named pipes at `paths`; whatever still waits to read one is let go (end of file) afterwards."""
    import os

    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
    try:
        yield
    finally:  # a reader let go may go on to open the next pipe: until none has waited for a second
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1:
            for path in paths:
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    quiet_since = time.monotonic()
                except OSError:  # no reader waits: nothing to let go
                    pass
            time.sleep(0.05)


def test_a_fifo_in_runs_blocks_no_page_request(base_engine, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    runs = tmp_path / "runs"
    pipes = [runs / "piped" / name for name in ("run.json", "metrics.json", "log.jsonl", "train_config.yaml")]
    pipes += [runs / "report" / name for name in ("report.html", "report.json", "compare.yaml")]
    runs.mkdir()
    with client_for(fresh(base_engine), runs=str(runs)) as c, ThreadPoolExecutor(4) as pool, fifos(pipes):
        paths = ["/v1/runs", "/v1/runs/piped", "/v1/reports", "/v1/reports/report"]
        answers = [pool.submit(c.get, path) for path in paths]
        statuses = [answer.result(timeout=30).status_code for answer in answers]
    assert statuses == [200, 200, 200, 404]


def test_a_hung_runs_directory_holds_no_chat_request(base_engine, tmp_path, monkeypatch):
    """A hung mount under --runs: each page request gives up after the page's time limit (503), on threads of
    its own, so the threads that parse chat bodies stay free and chat goes on."""
    from concurrent.futures import ThreadPoolExecutor

    from tunesmith.serve.routes import web

    (tmp_path / "run").mkdir()
    hung = threading.Event()
    monkeypatch.setattr(web, "_walk", lambda root: hung.wait(60))
    monkeypatch.setattr(web, "READ_TIMEOUT_S", 1.0)
    with client_for(fresh(base_engine), runs=str(tmp_path)) as c, ThreadPoolExecutor(48) as pool:
        try:
            pages = [pool.submit(c.get, "/v1/runs") for _ in range(45)]
            time.sleep(0.5)  # every page request has started, and holds whatever it holds
            assert text_of(pool.submit(chat, c).result(timeout=20))
            answers = [page.result(timeout=30) for page in pages]
        finally:
            hung.set()
    assert {r.status_code for r in answers} == {503}
    assert assert_envelope(answers[0], 503)["code"] == "runs_unavailable"


# -- 11. big legal requests stall no one: schemas compile one at a time, off every shared thread -----------------

class CompileSpy:
    """Stands in for llguidance.LLMatcher: records on which thread each compile runs and how many run at once,
    and holds the compile of any grammar naming `held` until `go` is set."""

    def __init__(self, real, held: str):
        self.real, self.held, self.go = real, held, threading.Event()
        self.threads, self.active, self.most, self.lock = [], 0, 0, threading.Lock()
        self.holding = threading.Event()
        spy = self

        class Matcher:
            def __new__(cls, tokenizer, grammar, **kwargs):
                return spy.run(lambda: real(tokenizer, grammar, **kwargs), spy.held in grammar)

            grammar_from_json_schema = staticmethod(lambda *a, **k: spy.run(
                lambda: real.grammar_from_json_schema(*a, **k)))
            validate_grammar_with_warnings = staticmethod(lambda *a, **k: spy.run(
                lambda: real.validate_grammar_with_warnings(*a, **k)))
            grammar_from_lark = staticmethod(real.grammar_from_lark)

        self.matcher = Matcher

    def run(self, compile_, hold: bool = False):
        with self.lock:
            self.threads.append(threading.current_thread().name)
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            if hold:
                self.holding.set()
                assert self.go.wait(60)
            return compile_()
        finally:
            with self.lock:
                self.active -= 1


def distinct_schema(i: int, marker: str = "plain") -> dict:
    return json_schema({"type": "object", "properties": {f"{marker}_{i}_{j}": {"type": "integer"} for j in range(40)}})


def test_schemas_compile_one_at_a_time_on_the_grammar_threads(base_engine, monkeypatch):
    """Never on the event loop, the engine's thread or the threads that parse request bodies; never two at once
    (16 big schemas at once took both cores from everyone)."""
    import llguidance
    from concurrent.futures import ThreadPoolExecutor

    spy = CompileSpy(llguidance.LLMatcher, held="never")
    monkeypatch.setattr(llguidance, "LLMatcher", spy.matcher)
    with client_for(fresh(base_engine)) as c, ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: chat(c, max_tokens=2, response_format=distinct_schema(i)), range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    assert len(spy.threads) >= 18 and spy.most == 1
    assert {name.split("_")[0] for name in spy.threads} == {"tunesmith-grammar"}, set(spy.threads)


def test_a_cached_schema_and_plain_chat_answer_while_a_big_schema_compiles(base_engine, monkeypatch):
    import llguidance
    from concurrent.futures import ThreadPoolExecutor

    spy = CompileSpy(llguidance.LLMatcher, held="held_marker")
    monkeypatch.setattr(llguidance, "LLMatcher", spy.matcher)
    cached = {"response_format": {"type": "json_object"}, "max_tokens": 2}
    with client_for(fresh(base_engine)) as c, ThreadPoolExecutor(3) as pool:
        assert chat(c, **cached).status_code == 200  # compiled and kept
        big = pool.submit(chat, c, max_tokens=2, response_format=distinct_schema(0, "held_marker"))
        try:
            assert spy.holding.wait(30)
            assert pool.submit(chat, c, **cached).result(timeout=20).status_code == 200
            assert text_of(pool.submit(chat, c).result(timeout=20)) is not None
            assert not big.done()
        finally:
            spy.go.set()
        assert big.result(timeout=60).status_code == 200

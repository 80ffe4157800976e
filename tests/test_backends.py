"""The same API tests against both decoders (`tunesmith serve --backend torch|llama-cpp`), through a real uvicorn
server and the official `openai` client: every route, the conversation store, auth and errors behave alike,
and the same prompt gives the same greedy text on both. The llama-cpp half skips without llama-cpp-python
(`make setup-fast`); the tiny model is a full-weight run, which the llama-cpp backend exports to GGUF on first
use (into a cache directory of this module's own): at f16 here, where the greedy text must match torch's, not at
the q8_0 users get by default."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from serve_assets import (TOOLS, WINDOW, check_call, check_three_turn_conversation, gate, streamed_calls,
                          uvicorn_on_loopback, write_base, write_run)

KEY = "test-key"
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (make setup-fast)")
BACKENDS = ["torch", pytest.param("llama-cpp", marks=needs_llama_cpp)]
# One llama.cpp thread for the tiny model, as conftest gives torch one: its threads sync by spinning, and a
# second thread that another process keeps off a core of this 2-core machine makes each step take ~100 ms.
LLAMA_OPTIONS = {"llama-cpp": {"threads": 1, "gguf_quant": "f16"}}
PROMPTS = ["What is the capital of France?", "Q: 2+2?\nA:", "Review: boring. Sentiment:"]
USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def assets(bpe, tmp_path_factory):
    """A tiny Llama saved as a full-weight tunesmith run (servable by both backends), a LoRA run over it, a
    prompt-tuning run (no merged weights: torch only), and a cache directory for the GGUF exports."""
    from tunesmith.data.templates import chat_template_for, template_fingerprint
    from tunesmith.models import load_tokenizer

    root = tmp_path_factory.mktemp("backends")
    base = write_base(bpe, root / "base")
    fingerprint = template_fingerprint(chat_template_for(load_tokenizer(str(base))))
    (base / "run.json").write_text(json.dumps({"task": "sft", "base_model": "tiny", "method": "full", "peft": False,
                                               "labels": None, "chat_template_fingerprint": fingerprint}))
    return SimpleNamespace(root=root, base=base, model=str(base), lora=write_run(base, root / "lora", "lora"),
                           prompt=write_run(base, root / "prompt", "prompt_tuning"), cache=root / "cache")


def _servers(assets, model: str, adapters: dict, name: str, **options):
    """start(backend): a live server of that backend over `model` (engine `options` beside the defaults),
    started once per module."""
    from tunesmith.serve import BACKENDS as LOADERS
    from tunesmith.serve import ServeSettings, create_app

    started = {}
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNESMITH_CACHE", str(assets.cache))

        def start(backend: str):
            if backend not in started:
                engine = LOADERS[backend].load_engine(model, adapters, max_batch=16, **LLAMA_OPTIONS.get(backend, {}),
                                                      **options)
                settings = ServeSettings(api_key=KEY, conversations=str(assets.root / f"{name}-{backend}.sqlite"))
                url = stack.enter_context(uvicorn_on_loopback(create_app(engine, settings)))
                started[backend] = SimpleNamespace(url=url, engine=engine, backend=backend)
            return started[backend]
        yield start


@pytest.fixture(scope="module")
def servers(assets):
    """start(backend): a live server of that backend over the tiny run (adapter "mine" = the LoRA run)."""
    yield from _servers(assets, assets.model, {"mine": str(assets.lora)}, "main")


@pytest.fixture(scope="module")
def uncached_servers(assets):
    """start(backend): as `servers`, without a prefix cache (--prefix-cache-mb 0)."""
    yield from _servers(assets, assets.model, {"mine": str(assets.lora)}, "uncached", prefix_cache_mb=0)


@pytest.fixture(scope="module")
def tool_servers(assets, bpe):
    """start(backend): a live server over a tiny run with room for tool definitions (a WINDOW-token context),
    trained with tools as the convention writes them."""
    from tunesmith.data.templates import chat_template_for, template_fingerprint
    from tunesmith.models import load_tokenizer

    base = write_base(bpe, assets.root / "tools", context=WINDOW)
    fingerprint = template_fingerprint(chat_template_for(load_tokenizer(str(base))))
    (base / "run.json").write_text(json.dumps({"task": "sft", "base_model": "tiny", "method": "full", "peft": False,
                                               "labels": None, "chat_template_fingerprint": fingerprint,
                                               "tools": {"mode": "convention", "style": "hermes"}}))
    yield from _servers(assets, str(base), {}, "tools")


@pytest.fixture(params=BACKENDS)
def server(request, servers):
    return servers(request.param)


@pytest.fixture(params=BACKENDS)
def tool_server(request, tool_servers):
    return tool_servers(request.param)


def client_of(server, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def client(server):
    return client_of(server)


def complete(client, model, prompt, **kw):
    return client.completions.create(model=model, prompt=prompt, **{"max_tokens": 16, "temperature": 0, **kw})


def wait_idle(server):
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health").json()["running"]:
        assert time.monotonic() < deadline, "rows still running"
        time.sleep(0.02)


# -- the same text on both backends -------------------------------------------------------------------------

@needs_llama_cpp
def test_both_backends_give_the_same_greedy_text(servers, assets):
    torch_client, llama_client = client_of(servers("torch")), client_of(servers("llama-cpp"))
    for model in (assets.model, "mine"):
        for prompt in PROMPTS:
            expected = complete(torch_client, model, prompt, max_tokens=24).choices[0]
            got = complete(llama_client, model, prompt, max_tokens=24).choices[0]
            assert (got.text, got.finish_reason) == (expected.text, expected.finish_reason), (model, prompt)
        expected = torch_client.chat.completions.create(model=model, messages=USER, max_tokens=24, temperature=0)
        got = llama_client.chat.completions.create(model=model, messages=USER, max_tokens=24, temperature=0)
        assert got.choices[0].message.content == expected.choices[0].message.content
        assert got.usage == expected.usage
    # the LoRA run really is another model: its merged GGUF does not answer like the base
    assert complete(llama_client, "mine", PROMPTS[0]).choices[0].text != \
        complete(llama_client, assets.model, PROMPTS[0]).choices[0].text


@needs_llama_cpp
def test_logprobs_agree_across_backends(servers, assets):
    """The same tokens, and logprobs within what f16 weights move them (the sampler computes them on both)."""
    replies = [complete(client_of(servers(b)), assets.model, PROMPTS[1], max_tokens=8, logprobs=3)
               for b in ("torch", "llama-cpp")]
    (a, b) = (r.choices[0].logprobs for r in replies)
    assert a.tokens == b.tokens
    assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 0.02
    # echo + logprobs with max_tokens 0 scores the prompt (lm-evaluation-harness' log-likelihoods)
    scored = [complete(client_of(servers(b)), assets.model, PROMPTS[0], max_tokens=0, echo=True, logprobs=1)
              for b in ("torch", "llama-cpp")]
    a, b = (s.choices[0].logprobs.token_logprobs for s in scored)
    assert a[0] is None and b[0] is None and len(a) == len(b) > 3
    assert max(abs(x - y) for x, y in zip(a[1:], b[1:])) < 0.02


# -- the API, on each backend -------------------------------------------------------------------------------

def test_models_and_health(client, server, assets):
    assert {m.id for m in client.models.list()} == {assets.model, "mine"}
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0


def test_streaming_equals_non_streaming_and_a_seed_repeats(client, assets):
    args = dict(messages=USER, max_tokens=12, temperature=0.9, seed=4)
    for model in (assets.model, "mine"):
        whole = client.chat.completions.create(model=model, **args).choices[0].message.content
        chunks = list(client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                                     **args))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
        assert chunks[-1].usage.completion_tokens > 0
        assert client.chat.completions.create(model=model, **args).choices[0].message.content == whole
        streamed = "".join(c.choices[0].text for c in complete(client, model, PROMPTS[0], stream=True))
        assert streamed == complete(client, model, PROMPTS[0]).choices[0].text


def test_max_tokens_and_stop_sequences(client, assets):
    full = complete(client, assets.model, PROMPTS[0], max_tokens=20).choices[0]
    assert full.finish_reason == "length"
    reply = complete(client, assets.model, PROMPTS[0], max_tokens=5)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    assert full.text.startswith(reply.choices[0].text)
    stop = full.text[len(full.text) // 2:][:3]  # a string from the middle of the greedy reply
    cut = complete(client, assets.model, PROMPTS[0], max_tokens=20, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]


def _stop_at(tokens: list[str]) -> int:
    """The index of a reply token whose text first appears at its own start (a stop string cutting there)."""
    text = "".join(tokens)
    return next(k for k in range(2, len(tokens)) if tokens[k].strip()
                and text.index(tokens[k]) == len("".join(tokens[:k])))


def test_a_stop_string_leaves_no_token_in_the_logprobs(client, assets):
    """The logprobs are those of the text returned: a token swallowed by a stop string (or held back as its
    possible start and then swallowed) is not in them, so the text rebuilt from them is the reply."""
    sampled = {"max_tokens": 16, "temperature": 1.0, "seed": 7}  # a random model's greedy reply repeats one token
    whole = complete(client, assets.model, PROMPTS[1], logprobs=1, **sampled).choices[0]
    full = whole.logprobs.tokens
    k = _stop_at(full)
    for stop in (full[k], full[k] + full[k + 1]):
        reply = complete(client, assets.model, PROMPTS[1], logprobs=1, stop=[stop], **sampled).choices[0]
        assert (reply.text, reply.logprobs.tokens) == ("".join(full[:k]), full[:k]), stop
    # held back as a possible start of the stop string, then let go: every token is there once
    reply = complete(client, assets.model, PROMPTS[1], logprobs=1, stop=[full[k] + "\x00never"], **sampled)
    assert (reply.choices[0].text, reply.choices[0].logprobs.tokens) == (whole.text, full)
    chat = client.chat.completions.create(model=assets.model, messages=USER, logprobs=True, **sampled)
    said = [t.token for t in chat.choices[0].logprobs.content]
    cut = client.chat.completions.create(model=assets.model, messages=USER, logprobs=True,
                                         stop=[said[_stop_at(said)]], **sampled)
    assert "".join(t.token for t in cut.choices[0].logprobs.content) == cut.choices[0].message.content == \
        "".join(said[:_stop_at(said)])


def test_echo_with_logprobs_0_gives_each_token_its_own_logprob(client, assets):
    """As vLLM (and OpenAI's completions: "up to logprobs + 1 elements"), top_logprobs holds the token itself."""
    reply = complete(client, assets.model, PROMPTS[0], max_tokens=3, echo=True, logprobs=0).choices[0].logprobs
    assert reply.top_logprobs[0] is None and len(reply.tokens) > 4
    for token, logprob, top in zip(reply.tokens[1:], reply.token_logprobs[1:], reply.top_logprobs[1:]):
        assert top == {token: logprob}


def test_concurrent_clients_get_what_each_gets_alone(client, server, assets):
    alone = {p: complete(client, assets.model, p).choices[0].text for p in PROMPTS}
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda i: complete(client, assets.model, PROMPTS[i % 3]).choices[0].text, range(16)))
    assert texts == [alone[PROMPTS[i % 3]] for i in range(16)]
    wait_idle(server)


def test_n_choices_and_json_mode(client, assets):
    reply = complete(client, assets.model, PROMPTS[0], n=3, temperature=1.0, seed=1, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens <= 18
    tokenizer = __import__("tunesmith.models", fromlist=["load_tokenizer"]).load_tokenizer(assets.model)
    bias = {str(tokenizer.convert_tokens_to_ids(t)): 4.0 for t in ('"', "}", "]", "0")}
    reply = client.chat.completions.create(model=assets.model, messages=USER, max_tokens=64, temperature=1.0,
                                           seed=0, logit_bias=bias, response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_a_schema_beyond_the_grammars_limits_is_refused_or_ends_saying_so(client, assets):
    import openai

    loop = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    branches = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"const": i}}, "required": [f"k{i}"]}
                          for i in range(2500)]}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=assets.model, messages=USER, response_format={
            "type": "json_schema", "json_schema": {"name": "loop", "schema": loop}})
    assert err.value.body["param"] == "response_format"
    reply = client.chat.completions.create(model=assets.model, messages=USER, max_tokens=40, temperature=1.0, seed=0,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "many", "schema": branches}})
    assert reply.choices[0].finish_reason == "grammar_error"


def test_a_conversation_of_three_turns(client, server, assets):
    check_three_turn_conversation(client, server.url, KEY)


def test_auth_and_errors_keep_the_envelope(client, server, assets):
    import openai

    with pytest.raises(openai.AuthenticationError):
        client_of(server, "wrong").models.list()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=USER)
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=assets.model, messages=[{"role": "robot", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, assets.model, PROMPTS[0], max_tokens=10_000)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, assets.model, PROMPTS[0], logit_bias={"100000": 1})
    assert err.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as err:  # more digits than Python turns into an int
        complete(client, assets.model, PROMPTS[0], logit_bias={"9" * 5000: 1})
    assert err.value.body["param"] == "logit_bias" and len(err.value.body["message"]) < 200


def test_hung_up_streams_stop_and_free_their_cache(server, assets):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": assets.model, "messages": USER, "max_tokens": 60, "temperature": 1.0, "stream": True}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        for _ in range(6):
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the first chunk has arrived: generation is under way; hang up
        wait_idle(server)
        assert http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4}).status_code == 200
    wait_idle(server)
    if server.backend == "llama-cpp":  # every sequence id and KV-cache cell is free again (cached prefixes live
        for served in server.engine.models.values():  # in host memory, not in the cache)
            model = served.module
            assert model.reserved == 0 and sorted(model.free_seqs) == list(range(model.n_seq_max))
            assert all(model.lib.llama_memory_seq_pos_max(model.memory, seq) == -1 for seq in range(model.n_seq_max))
            assert len(model.prefixes) > 0


def test_loading_a_run_while_serving(server, assets):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(assets.lora)})
        assert r.status_code == 200, r.text
        same = [http.post("/v1/completions", json={"model": m, "prompt": PROMPTS[0], "max_tokens": 8,
                                                   "temperature": 0}).json()["choices"][0]["text"]
                for m in ("mine", "again")]
        assert same[0] == same[1]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200
    if server.backend == "llama-cpp":  # exported at the type the server was started with, not the default
        from tunesmith.export.cache import run_key

        assert (assets.cache / "gguf" / run_key(assets.lora, "f16") / "model.gguf").is_file()
        assert not (assets.cache / "gguf" / run_key(assets.lora, "q8_0")).exists()


def test_a_request_being_prepared_when_its_model_is_unloaded_still_finishes(server, assets, monkeypatch):
    """The chat route looks the model up, then compiles the response_format before queuing: an unload in
    between must not turn the accepted request into a 500; it finishes on the model it was accepted for."""
    from tunesmith.serve import jobs

    headers = {"Authorization": f"Bearer {KEY}"}
    compiling, go = gate(monkeypatch, jobs, "token_mask")
    body = {"model": "doomed", "messages": USER, "max_tokens": 8, "temperature": 0,
            "response_format": {"type": "json_object"}}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "doomed", "lora_path": str(assets.lora)}
                         ).status_code == 200
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.post, "/v1/chat/completions", json=body)
            assert compiling.wait(60)
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "doomed"}).status_code == 200
            go.set()
            reply = pending.result(120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert http.post("/v1/chat/completions", json=body).status_code == 404  # gone for the next request
    wait_idle(server)


def _broken_runs(lora: Path, root: Path) -> dict[str, tuple[Path | str, str]]:
    """{case: (lora_path, what the 400 must say)}: copies of a good LoRA run, each broken in one way."""
    import shutil

    from safetensors.torch import load_file, save_file

    def copy(name: str, **files: str | bytes | None) -> Path:
        run = root / name
        if not run.exists():
            shutil.copytree(lora, run)
            for file, content in files.items():
                target = run / file.replace("__", ".")
                if content is None:
                    target.unlink()
                else:
                    target.write_bytes(content if isinstance(content, bytes) else content.encode())
        return run

    info = json.loads((lora / "run.json").read_text())
    weights = (lora / "adapter_model.safetensors").read_bytes()
    tensors = load_file(lora / "adapter_model.safetensors")
    wrong = {k: (v[:, :-1].contiguous() if v.dim() == 2 else v) for k, v in tensors.items()}
    save_file(wrong, root / "wrong.safetensors")
    return {
        "long path": ("/" + "a" * 10_000, "longer than"),
        "not json": (copy("notjson", run__json="{nope"), "run.json"),
        "a list": (copy("list", run__json="[1, 2]"), "not a JSON object"),
        "empty object": (copy("empty", run__json="{}"), "task"),
        "task null": (copy("tasknull", run__json=json.dumps({**info, "task": None})), "task"),
        "deeply nested": (copy("nested", run__json='{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), "nested"),
        "huge integer": (copy("bigint", run__json='{"task": ' + "9" * 5000 + "}"), "digits"),
        "no adapter config": (copy("noconfig", adapter_config__json=None), "adapter_config.json"),
        "broken adapter config": (copy("badconfig", adapter_config__json="{not json"), "adapter_config.json"),
        "config a list": (copy("listconfig", adapter_config__json="[]"), "adapter_config.json"),
        "no weights": (copy("noweights", adapter_model__safetensors=None), "adapter_model"),
        "corrupt weights": (copy("corrupt", adapter_model__safetensors=b"\x00" * 64), "adapter_model.safetensors"),
        "truncated weights": (copy("truncated", adapter_model__safetensors=weights[:len(weights) // 2]),
                              "adapter_model.safetensors"),
        "another shape": (copy("shape", adapter_model__safetensors=(root / "wrong.safetensors").read_bytes()),
                          "shape"),
    }


def test_loading_a_broken_run_is_a_400_naming_the_problem(server, assets, tmp_path_factory):
    """Each way a run can be broken on disk is refused with a sentence that names what is wrong, never a
    traceback; so are names that could not be used as a model name."""
    cases = _broken_runs(assets.lora, tmp_path_factory.mktemp(f"broken-{server.backend}"))
    headers = {"Authorization": f"Bearer {KEY}"}
    wrong = []
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as http:
        for case, (path, says) in cases.items():
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(path)})
            error = r.json()["error"] if r.status_code != 200 else {}
            if (r.status_code, error.get("param")) != (400, "lora_path") or says not in error["message"] \
                    or "Traceback" in error["message"] or len(error["message"]) > 1000:
                wrong.append((case, r.status_code, r.text[:300]))
        for name in ("two\nlines", "a/b", "x" * 10_000, " "):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(assets.lora)})
            if r.status_code != 400 or r.json()["error"]["param"] != "lora_name":
                wrong.append((name[:20], r.status_code, r.text[:300]))
        assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {assets.model, "mine"}
    assert wrong == []


# -- tool calling, on each backend ----------------------------------------------------------------------------

def ask_tools(client, **kw):
    model = client.models.list().data[0].id
    return client.chat.completions.create(model=model, **{"messages": USER, "tools": TOOLS, "max_tokens": 200,
                                                          "temperature": 1.0, **kw})


def test_forced_calls_validate_and_stream_as_they_answer(tool_server):
    client = client_of(tool_server)
    assert client.models.list().data[0].model_dump()["tools"] == {"mode": "convention", "style": "hermes"}
    for kw in ({"tool_choice": "required", "seed": 3, "max_tokens": 400},
               {"tool_choice": {"type": "function", "function": {"name": "add"}}, "seed": 5}):
        whole = ask_tools(client, **kw).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content is None
        for call in whole.message.tool_calls:
            check_call(call)
        content, calls, finish = streamed_calls(ask_tools(client, stream=True, **kw))
        assert (content, finish) == ("", "tool_calls")
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_a_tool_result_reaches_the_model_as_training_renders_it(tool_server, monkeypatch):
    """The openai SDK's loop: call, run the function, send its result; the next prompt is training's rendering."""
    from tunesmith.data.tokenize import tokenize_chat

    client, engine, seen = client_of(tool_server), tool_server.engine, []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda requests: (seen.extend(requests), submit(requests))[1])
    call = ask_tools(client, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                     seed=0).choices[0].message.tool_calls[0]
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
               {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    final = ask_tools(client, messages=history, max_tokens=4, temperature=0)
    assert final.choices[0].message.tool_calls is None and final.usage.prompt_tokens == len(seen[-1].ids)
    trained = tokenize_chat(engine.tokenizer, [*history, {"role": "assistant", "content": "Sunny."}], tools=TOOLS)
    prompt = seen[-1].ids
    assert trained.input_ids[:len(prompt)] == prompt
    assert engine.tokenizer.decode([t for t in trained.labels[len(prompt):] if t >= 0]) == "Sunny.<|im_end|>"


@needs_llama_cpp
def test_both_backends_make_the_same_greedy_call(tool_servers):
    kw = {"tool_choice": "required", "parallel_tool_calls": False, "temperature": 0}
    expected = ask_tools(client_of(tool_servers("torch")), **kw).choices[0].message.tool_calls[0].function
    got = ask_tools(client_of(tool_servers("llama-cpp")), **kw).choices[0].message.tool_calls[0].function
    assert (got.name, got.arguments) == (expected.name, expected.arguments)


# -- the llama-cpp backend's models: GGUF files, runs exported and cached, clear refusals ----------------------

@needs_llama_cpp
def test_a_gguf_file_serves_as_the_run_it_was_exported_from(servers, assets):
    from tunesmith.export.cache import run_key
    from tunesmith.serve.backends import load_gguf_engine

    gguf = assets.cache / "gguf" / run_key(assets.base, "f16") / "model.gguf"
    servers("llama-cpp")  # exported the run into the cache
    assert gguf.is_file()
    engine = load_gguf_engine(str(gguf), threads=1)
    expected = complete(client_of(servers("llama-cpp")), assets.model, PROMPTS[1]).choices[0].text
    assert generate(engine, PROMPTS[1]) == expected


def generate(engine, prompt: str, max_tokens: int = 16) -> str:
    from tunesmith.generation import Request

    events = []
    engine.threaded = False
    engine.submit([Request(next(iter(engine.models)), engine.tokenizer(prompt)["input_ids"], max_tokens,
                           events.append, temperature=0)])
    while engine.busy:
        engine.step()
    assert not any(e.error for e in events), events
    return "".join(e.text for e in events)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lora_run_serves_as_the_model_with_its_adapter_merged(backend, servers, assets):
    """`--model RUN` for a LoRA run: both backends answer as the base server does for that run as an adapter."""
    from tunesmith.serve import BACKENDS as LOADERS

    engine = LOADERS[backend].load_engine(str(assets.lora), **LLAMA_OPTIONS.get(backend, {}))
    expected = complete(client_of(servers("torch")), "mine", PROMPTS[0]).choices[0].text
    assert expected != complete(client_of(servers("torch")), assets.model, PROMPTS[0]).choices[0].text
    assert generate(engine, PROMPTS[0]) == expected


def test_a_prompt_tuning_run_as_the_model_is_refused_with_what_to_do(assets):
    from tunesmith.serve import ServeError, load_engine

    with pytest.raises(ServeError) as refused:
        load_engine(str(assets.prompt))
    assert str(refused.value) == (f"--model {assets.prompt}: a prompt_tuning run cannot be served as the base model; "
                                  f"serve its base with --model {assets.base} --adapter NAME={assets.prompt}")


@needs_llama_cpp
def test_requests_wait_for_room_in_the_kv_cache_instead_of_failing(servers, assets):
    """The cache holds one window (256 cells for the tiny model): rows that would not fit beside the running
    ones wait their turn, and every reply is what it is alone."""
    from tunesmith.generation import Request
    from tunesmith.export.cache import run_key
    from tunesmith.serve.backends import load_gguf_engine

    servers("llama-cpp")
    engine = load_gguf_engine(str(assets.cache / "gguf" / run_key(assets.base, "f16") / "model.gguf"), max_batch=8,
                              threads=1)
    engine.threaded = False
    cells = next(iter(engine.models.values())).module.cells
    ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    alone = generate(engine, PROMPTS[0], max_tokens=100)
    events, most = [[] for _ in range(6)], 0
    engine.submit([Request(next(iter(engine.models)), ids, 100, events[i].append, temperature=0) for i in range(6)])
    while engine.busy:
        engine.step()
        most = max(most, engine.stats()["running"])
    assert most == cells // (len(ids) + 100) < 6
    assert ["".join(e.text for e in ev) for ev in events] == [alone] * 6


def test_a_changed_run_is_exported_again(assets, tmp_path, monkeypatch):
    import shutil

    from tunesmith.serve import backends

    run = Path(shutil.copytree(assets.lora, tmp_path / "run"))
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    calls = []

    def export_gguf(run, out, **options):
        calls.append(options)
        Path(out).write_bytes(b"GGUF")

    monkeypatch.setattr("tunesmith.export.cache.export_gguf", export_gguf)
    monkeypatch.setattr("tunesmith.export.cache.verify_gguf", lambda run, path, **_: SimpleNamespace(ok=True))
    first = backends.exported(run)
    assert backends.exported(run) == first and len(calls) == 1 and calls[0]["quant"] == "q8_0"  # the default
    exact = backends.exported(run, "f16")  # another type is another file, exported once
    assert exact != first and backends.exported(run, "f16") == exact and calls[1]["quant"] == "f16"
    del calls[1:]
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "state.bin").write_bytes(b"x")  # not part of the weights: same export
    assert backends.exported(run) == first and len(calls) == 1
    weights = next(run.glob("adapter_model.*"))
    weights.write_bytes(weights.read_bytes() + b" ")
    assert backends.exported(run) != first and len(calls) == 2


def test_a_run_whose_export_fails_verification_is_refused_with_a_finer_type(assets, tmp_path, monkeypatch):
    from tunesmith.export import TOLERANCE, Tolerance
    from tunesmith.serve import ServeError
    from tunesmith.serve.backends import exported

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setitem(TOLERANCE, "q4_0", Tolerance(top1=1.0, kl=0.0))
    with pytest.raises(ServeError, match=rf"^{assets.lora} exported at q4_0 does not match the run \(transformers: "
                                         r".*\); serve it at a finer --gguf-quant such as q8_0, or export it yourself "
                                         r"with `tunesmith export RUN --gguf --no-verify` and serve that file$"):
        exported(assets.lora, "q4_0")
    assert not list((tmp_path / "gguf").iterdir())  # nothing half-made is cached


@needs_llama_cpp
def test_runs_the_llama_cpp_backend_cannot_serve_are_refused_by_name(assets, monkeypatch):
    from tunesmith.serve import ServeError
    from tunesmith.serve.backends import load_gguf_engine

    monkeypatch.setenv("TUNESMITH_CACHE", str(assets.cache))
    with pytest.raises(ServeError, match="adapter 'soft'.*--backend torch"):
        load_gguf_engine(assets.model, {"soft": str(assets.prompt)})
    with pytest.raises(ServeError, match="tunesmith run directory"):
        load_gguf_engine(str(assets.root))
    with pytest.raises(ServeError, match="runs on the CPU"):
        load_gguf_engine(assets.model, device="cuda")


def test_llama_cpp_flags_are_refused_with_the_torch_backend(assets, capsys):
    from tunesmith.cli import main

    code = main(["serve", "--model", assets.model, "--threads", "2", "--gguf-quant", "f16"])
    err = capsys.readouterr().err
    assert code != 0 and "--threads and --gguf-quant apply to --backend llama-cpp only" in err
    assert "Traceback" not in err
    assert main(["serve", "--model", assets.model, "--batch-invariance", "on"]) != 0
    assert "--batch-invariance apply to --backend llama-cpp only" in capsys.readouterr().err


def test_without_llama_cpp_serve_names_make_setup_fast(assets, monkeypatch, capsys):
    from tunesmith.cli import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    code = main(["serve", "--backend", "llama-cpp", "--model", assets.model])
    err = capsys.readouterr().err
    assert code != 0 and "make setup-fast" in err and "Traceback" not in err


# -- one scheduler over both decoders: prefix reuse, chunked prefill, admission, scoring ----------------------

def cached_tokens(reply) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_reuse_changes_no_greedy_reply_of_a_conversation(backend, servers, uncached_servers, assets):
    """Each turn of a server-side conversation resends the history: with the prefix cache it reads only what
    is new (the earlier turns come from the cache, as usage says), and replies exactly as without it."""
    questions = ["Hello", "What is 2+2?", "And 3+3?", "Thanks"]
    replies = {}
    for server in (servers(backend), uncached_servers(backend)):
        headers = {"Authorization": f"Bearer {KEY}"}
        for model in (assets.model, "mine"):
            cid = httpx.post(server.url + "/v1/conversations", json={"system": "Be terse."}, headers=headers).json()
            replies[server.url, model] = [client_of(server).chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=6, temperature=0,
                extra_body={"conversation": cid["id"]}) for q in questions]
    cached, uncached = servers(backend).url, uncached_servers(backend).url
    for model in (assets.model, "mine"):
        texts = [[r.choices[0].message.content for r in replies[url, model]] for url in (cached, uncached)]
        assert texts[0] == texts[1]
        assert [cached_tokens(r) for r in replies[uncached, model]] == [0] * len(questions)
        for before, turn in zip(replies[cached, model], replies[cached, model][1:]):
            # all of the previous turn's prompt at least; never all of this one's (its last token is computed)
            assert before.usage.prompt_tokens <= cached_tokens(turn) < turn.usage.prompt_tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cached_prefix_serves_its_own_adapter_only(backend, servers, uncached_servers, assets):
    client = client_of(servers(backend))
    prompt = f"A prompt the {backend} base reads first, then its adapter."
    first, again, mine, mine_again = (complete(client, model, prompt, max_tokens=8)
                                      for model in (assets.model, assets.model, "mine", "mine"))
    tokens = first.usage.prompt_tokens
    assert [cached_tokens(r) for r in (first, again, mine, mine_again)] == [0, tokens - 1, 0, tokens - 1]
    assert again.choices[0].text == first.choices[0].text != mine.choices[0].text == mine_again.choices[0].text
    assert mine.choices[0].text == complete(client_of(uncached_servers(backend)), "mine", prompt,
                                            max_tokens=8).choices[0].text


def engine_for(backend: str, servers, assets, **options):
    """An engine of `backend` over the tiny run, driven by the test's own step() calls."""
    from tunesmith.export.cache import run_key
    from tunesmith.serve.backends import load_engine, load_gguf_engine

    if backend == "llama-cpp":
        servers("llama-cpp")  # exported the run into the cache
        gguf = assets.cache / "gguf" / run_key(assets.base, "f16") / "model.gguf"
        engine = load_gguf_engine(str(gguf), threads=1, **options)
    else:
        engine = load_engine(assets.model, **options)
    engine.threaded = False
    return engine


def run(engine, requests) -> None:
    engine.submit(requests)
    while engine.busy:
        engine.step()


def holds_nothing(engine) -> bool:
    """No row's place is held in the decoder (cached prefixes aside)."""
    if engine.backend == "llama-cpp":
        return all(served.module.reserved == 0 for served in engine.models.values())
    return not engine.decoder.prefilling and not engine.decoder.decoding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("when", ["admitted", "mid-prompt", "decoding"])
def test_a_row_cancelled_at_any_point_leaves_nothing_behind(backend, when, servers, assets, monkeypatch):
    """Cancelled right after admission (nothing cached yet), between two prompt pieces, or while decoding: the
    row leaves the decoder too, so the next request is never batched with a row that picked no token (it was a
    500 'NoneType object cannot be interpreted as an integer' after clients hung up)."""
    from tunesmith.generation import Request, SamplingParams

    engine = engine_for(backend, servers, assets)
    engine.prefill_chunk = 8
    tokenizer, model = engine.tokenizer, next(iter(engine.models))
    ids = tokenizer(" ".join(["Paris is nice."] * 6))["input_ids"]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, logit_bias={tokenizer.eos_token_id: -100.0})
    alone = []
    run(engine_for(backend, servers, assets, prefix_cache_mb=0), [Request(model, ids, params, alone.append)])
    gone, heard = Request(model, ids, params, None), []
    gone.emit = lambda e: (heard.append(e), gone.cancelled.set())  # "decoding": hangs up at its first token
    start, prefill = engine.decoder.start, engine.decoder.prefill
    if when == "admitted":
        monkeypatch.setattr(engine.decoder, "start", lambda row: (start(row), gone.cancelled.set()))
    elif when == "mid-prompt":
        monkeypatch.setattr(engine.decoder, "prefill", lambda rows, n: (gone.cancelled.set(), prefill(rows, n))[1])
    run(engine, [gone])
    assert len(heard) == (when == "decoding") and holds_nothing(engine)
    monkeypatch.undo()
    again = []
    run(engine, [Request(model, ids, params, again.append)])
    assert [(e.text, e.finish_reason, e.error) for e in again] == [(e.text, e.finish_reason, e.error) for e in alone]
    assert holds_nothing(engine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_prompt_is_read_in_pieces_while_a_running_row_keeps_decoding(backend, servers, assets):
    import math

    from tunesmith.generation import Request, SamplingParams

    engine = engine_for(backend, servers, assets, prefix_cache_mb=0)
    tokenizer, model = engine.tokenizer, next(iter(engine.models))
    params = SamplingParams(max_new_tokens=40, logprobs=0, logit_bias={tokenizer.eos_token_id: -100.0})
    short, long = tokenizer(PROMPTS[1])["input_ids"], tokenizer(" ".join(["Paris is nice."] * 15))["input_ids"]
    alone = [], []
    run(engine, [Request(model, short, params, alone[0].append)])
    run(engine, [Request(model, long, 4, alone[1].append, temperature=0)])
    engine.prefill_chunk = 8
    seen = []
    running = Request(model, short, params, lambda e: seen.append(("a", e)))
    engine.submit([running])
    while len(seen) < 2:
        engine.step()
    run(engine, [Request(model, long, 4, lambda e: seen.append(("b", e)), temperature=0)])
    after = [who for who, e in seen[2:] if e.text or e.token]
    # one piece of 8 prompt tokens per step, and one token of the running row per step meanwhile
    assert after.index("b") == math.ceil(len(long) / 8) - 1 and len(long) > 32
    for i, who in enumerate("ab"):
        assert "".join(e.text for w, e in seen if w == who) == "".join(e.text for e in alone[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_scores_are_the_same_read_in_pieces_or_at_once(backend, servers, assets):
    from tunesmith.generation import Request, SamplingParams

    engine = engine_for(backend, servers, assets)
    ids = engine.tokenizer(" ".join(PROMPTS))["input_ids"]
    scored = []
    for chunk in (256, 5):
        engine.prefill_chunk, events = chunk, []
        run(engine, [Request(next(iter(engine.models)), ids, SamplingParams(max_new_tokens=1, prompt_logprobs=2),
                             events.append)])
        prompt = events[0].prompt
        assert len(prompt) == len(ids) and prompt[0] is None and events[-1].cached_tokens == 0  # scoring reads all
        scored.append(([t.logprob for t in prompt[1:]], [t.top[0][0] for t in prompt[1:]], events[-2].text))
    assert scored[0][0] == pytest.approx(scored[1][0], abs=1e-3) and scored[0][1:] == scored[1][1:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_scoring_keeps_no_logits_of_the_whole_prompt(backend, servers, assets, monkeypatch):
    """Each piece read is scored as it comes ([chunk, V] at most), never [T, V] of the whole prompt."""
    import importlib

    from tunesmith.generation import Request, SamplingParams

    engine_module = importlib.import_module("tunesmith.generation.engine")
    engine, widths = engine_for(backend, servers, assets), []
    score = engine_module.prompt_logprobs
    monkeypatch.setattr(engine_module, "prompt_logprobs",
                        lambda logits, *args: (widths.append(logits.shape[0]), score(logits, *args))[1])
    engine.prefill_chunk = 8
    ids, events = engine.tokenizer(" ".join(PROMPTS))["input_ids"], []
    run(engine, [Request(next(iter(engine.models)), ids, SamplingParams(max_new_tokens=0, prompt_logprobs=1),
                         events.append)])
    assert max(widths) == 8 and sum(widths) == len(ids) > 16
    assert len(events[0].prompt) == len(ids) and events[-1].finish_reason == "length"


def test_scoring_a_long_prompt_n_times_holds_no_other_request_back(tool_server, monkeypatch):
    """echo + logprobs with n choices scores the prompt once (the choices share its scores), so a plain
    request sent while a long prompt is being scored ends before that scoring does, in the engine (each
    forward pass slowed alike, to stand for a real model)."""
    engine, seen, ended = tool_server.engine, [], []
    submit, prefill = engine.submit, engine.decoder.prefill

    def watched(requests):
        for r in requests:
            def emit(event, r=r, emit=r.emit):
                if event.finish_reason:
                    ended.append("scoring" if len(r.ids) > 300 else "plain")
                emit(event)
            r.emit = emit
        seen.extend(requests)
        submit(requests)

    monkeypatch.setattr(engine, "submit", watched)
    monkeypatch.setattr(engine.decoder, "prefill", lambda rows, chunk: (time.sleep(0.03), prefill(rows, chunk))[1])
    monkeypatch.setattr(engine, "prefill_chunk", 64)
    model = client_of(tool_server).models.list().data[0].id
    long = " ".join(["What is the capital of France? The capital of France is Paris."] * 60)

    def post(path: str, body: dict):
        with httpx.Client(base_url=tool_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            return http.post(path, json={"model": model, **body})

    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(post, "/v1/completions", {"prompt": long, "echo": True, "logprobs": 1, "max_tokens": 0,
                                                     "n": 16})
        deadline = time.monotonic() + 30
        while not engine.running:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        normal = pool.submit(post, "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
        big, normal = big.result(120), normal.result(120)
    assert (big.status_code, normal.status_code) == (200, 200)
    assert ended.index("plain") < len(ended) - 1 and ended[-1] == "scoring", ended
    choices = big.json()["choices"]
    assert len(choices) == 16 and all(c["logprobs"] == choices[0]["logprobs"] for c in choices)
    assert len(choices[0]["logprobs"]["tokens"]) == big.json()["usage"]["prompt_tokens"] > 600
    assert sum(r.params.prompt_logprobs is not None for r in seen) == 1  # scored once, not 16 times


@needs_llama_cpp
def test_a_rows_logits_do_not_depend_on_its_batch_on_llama_cpp(servers, assets):
    """--batch-invariance on: each prompt's scores and greedy reply logprobs, bit for bit, the same read and
    decoded alone as beside 7 others (llama.cpp picks its kernels by the number of tokens in a call:
    generation/llamacpp.py); off, they differ, by little (the bound docs/backends.md states). torch's batched
    matmuls round differently by batch size: its greedy texts match (test_concurrent_clients_get_what_each_gets_
    alone), not its last bits."""
    from tunesmith.generation import Request, SamplingParams

    engine = engine_for("llama-cpp", servers, assets, prefix_cache_mb=0, batch_invariance="on")
    model, params = next(iter(engine.models)), SamplingParams(max_new_tokens=12, logprobs=0, prompt_logprobs=0)
    prompts = [engine.tokenizer(p * (i + 1))["input_ids"] for i, p in enumerate(PROMPTS * 3)][:8]

    def scores(events) -> tuple:
        return ([t.logprob for t in events[0].prompt[1:]], [e.token.logprob for e in events if e.token])

    alone = []
    for ids in prompts:
        alone.append([])
        run(engine, [Request(model, ids, params, alone[-1].append)])
    together = [[] for _ in prompts]
    run(engine, [Request(model, ids, params, together[i].append) for i, ids in enumerate(prompts)])
    assert [scores(e) for e in together] == [scores(e) for e in alone]
    fast = engine_for("llama-cpp", servers, assets, prefix_cache_mb=0)  # the default: off
    apart, beside = [[] for _ in prompts], [[] for _ in prompts]
    for i, ids in enumerate(prompts):
        run(fast, [Request(model, ids, params, apart[i].append)])
    run(fast, [Request(model, ids, params, beside[i].append) for i, ids in enumerate(prompts)])
    gaps = [abs(x - y) for a, b in zip(apart, beside) for x, y in zip(sum(scores(a), []), sum(scores(b), []))]
    assert 0 < max(gaps) < 1e-3  # the tiny f16 model; a real model's close calls can flip: docs/backends.md


@pytest.mark.parametrize("backend", BACKENDS)
def test_at_most_max_batch_rows_run_and_the_others_wait_their_turn(backend, servers, assets):
    from tunesmith.generation import Request

    engine = engine_for(backend, servers, assets, max_batch=2)
    model, prompts = next(iter(engine.models)), [engine.tokenizer(p)["input_ids"] for p in PROMPTS * 2]
    alone = []
    for ids in prompts[:3]:
        alone.append([])
        run(engine, [Request(model, ids, 12, alone[-1].append, temperature=0)])
    events, most = [[] for _ in prompts], 0
    engine.submit([Request(model, ids, 12, events[i].append, temperature=0) for i, ids in enumerate(prompts)])
    while engine.busy:
        engine.step()
        most = max(most, engine.stats()["running"])
    assert most == 2
    texts = ["".join(e.text for e in ev) for ev in events]
    assert texts == ["".join(e.text for e in ev) for ev in alone] * 2

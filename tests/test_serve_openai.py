"""A real `tunesmith serve` on 127.0.0.1, driven with the official `openai` client: what a user's code sees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serve_assets import check_three_turn_conversation, write_base, write_run

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(bpe, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    base = write_base(bpe, root / "base")
    lora = write_run(base, root / "lora", "lora")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--model", str(base), "--adapter",
                             f"mine={lora}", "--port", str(port), "--api-key", KEY, "--conversations",
                             str(root / "c.sqlite")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.2)
    yield {"url": url, "base": str(base)}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_completion_and_chat(client, server):
    assert {m.id for m in client.models.list()} == {server["base"], "mine"}
    completion = client.completions.create(model=server["base"], prompt="Q: 2+2?", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 5
    reply = client.chat.completions.create(model=server["base"], messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=6, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens > 0


def test_streaming_equals_non_streaming_and_adapter_by_name(client, server):
    args = dict(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
                temperature=0.9, seed=4)
    for model in (server["base"], "mine"):
        whole = client.chat.completions.create(model=model, **args).choices[0].message.content
        chunks = client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                                **args)
        streamed = [c for c in chunks]
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole
        assert streamed[-1].usage.completion_tokens > 0
    base = client.chat.completions.create(model=server["base"], **{**args, "temperature": 0})
    mine = client.chat.completions.create(model="mine", **{**args, "temperature": 0})
    assert base.choices[0].message.content != mine.choices[0].message.content


def test_errors_map_to_sdk_exceptions(client, server):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server["base"], messages=[{"role": "robot", "content": "Hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_conversation_of_three_turns(client, server):
    check_three_turn_conversation(client, server["url"], KEY)


def test_aborted_streams_stop_and_leave_no_half_turn(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = server["url"]
    cid = httpx.post(f"{url}/v1/conversations", json={}, headers=headers).json()["id"]
    body = {"model": server["base"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50,
            "temperature": 1.0, "stream": True, "conversation": cid}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        for _ in range(12):
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the first chunk has arrived: generation is under way; hang up
        deadline = time.monotonic() + 60
        while http.get("/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get(f"/v1/conversations/{cid}/messages").json()["data"] == []
        fresh = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
        assert fresh.status_code == 200 and len(http.get(f"/v1/conversations/{cid}/messages").json()["data"]) == 2
        streamed = http.post("/v1/completions", json={"model": server["base"], "prompt": "Hi", "max_tokens": 3,
                                                      "stream": True})
        lines = [line for line in streamed.text.split("\n") if line]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["object"] == "text_completion"

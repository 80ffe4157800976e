"""One set of sampling limits on every surface: the same out-of-range value is refused by the Python API
(SamplingParams), the CLI (exit 2 and a sentence) and the server (400 in OpenAI's envelope naming the field),
and the edge of each range is accepted by all three."""

from __future__ import annotations

import pytest
from serve_assets import write_base

from tunesmith.cli import main
from tunesmith.generation import SamplingParams

# (SamplingParams field = the CLI flag's name, the API's field, a value outside the range, the sentence)
OUT_OF_RANGE = [
    ("temperature", "temperature", 2.5, "temperature 2.5 must be in [0, 2]"),
    ("temperature", "temperature", -0.5, "temperature -0.5 must be in [0, 2]"),
    ("top_p", "top_p", 1.5, "top_p 1.5 must be in (0, 1]"),
    ("top_p", "top_p", 0.0, "top_p 0.0 must be in (0, 1]"),
    ("presence_penalty", "presence_penalty", 2.5, "presence_penalty 2.5 must be in [-2, 2]"),
    ("frequency_penalty", "frequency_penalty", -3.0, "frequency_penalty -3.0 must be in [-2, 2]"),
    ("max_new_tokens", "max_tokens", -1, "max_new_tokens -1 must be 0 or more"),
]
EDGES = {"temperature": 2.0, "top_p": 1.0, "presence_penalty": -2.0, "frequency_penalty": 2.0, "max_new_tokens": 1}


@pytest.fixture(scope="module")
def server(bpe, tmp_path_factory):
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app, load_engine

    base = str(write_base(bpe, tmp_path_factory.mktemp("limits") / "base"))
    with TestClient(create_app(load_engine(base), ServeSettings())) as client:
        yield client, base


@pytest.mark.parametrize("field, api_field, value, sentence", OUT_OF_RANGE)
def test_python_refuses(field, api_field, value, sentence):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert str(err.value) == f"sampling settings: {sentence}"


@pytest.mark.parametrize("field, api_field, value, sentence", OUT_OF_RANGE)
def test_cli_refuses_before_loading_the_model(field, api_field, value, sentence, tmp_path, capsys):
    flag = "--" + field.replace("_", "-")
    for command in (["generate", "--prompt", "hi"], ["chat"], ["eval", "--data", "unused.jsonl"]):
        assert main([*command, "--model", str(tmp_path / "no-model"), flag, str(value)]) == 2
        assert capsys.readouterr().err == f"tunesmith: error: sampling settings: {sentence}\n"


@pytest.mark.parametrize("field, api_field, value, sentence", OUT_OF_RANGE)
def test_server_refuses_with_the_envelope(server, field, api_field, value, sentence):
    client, base = server
    body = {"model": base, "messages": [{"role": "user", "content": "hi"}], api_field: value}
    for path, request in (("/v1/chat/completions", body),
                          ("/v1/completions", {**{k: v for k, v in body.items() if k != "messages"}, "prompt": "hi"})):
        response = client.post(path, json=request)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", api_field)
        assert error["message"].startswith(f"{api_field}: Input should be ")


def test_the_edges_of_every_range_are_accepted_everywhere(server, capsys):
    client, base = server
    assert SamplingParams(**EDGES).temperature == 2.0
    flags = [arg for name, value in EDGES.items() for arg in ("--" + name.replace("_", "-"), str(value))]
    assert main(["generate", "--model", base, "--prompt", "hi", "--no-stream", "--seed", "0", *flags]) == 0
    assert "[1 tokens, finish_reason=" in capsys.readouterr().err
    api = {("max_tokens" if name == "max_new_tokens" else name): value for name, value in EDGES.items()}
    response = client.post("/v1/chat/completions", json={"model": base, "seed": 0, **api,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1

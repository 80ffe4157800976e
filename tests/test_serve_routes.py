"""The routes beside the OpenAI ones, in-process: POST /classify (labels equal each run's own offline
predictions, two heads and a tagger on one base) and loading/unloading runs while serving (live runs answer
as they do offline, share the base's weights, and requests in flight survive an unload)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from serve_assets import CONTEXT, gate, write_base, write_classifier, write_run

BASE = "base"
TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
TEXTS = ["great movie, loved it", "boring", "What is the capital of France? Paris."]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def write_head(base, directory, task: str, labels: list[str], seed: int):
    """A run with a randomly initialised head: sequence classification (`classify`) or token tagging (`ner`)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification, LlamaForTokenClassification

    config = AutoConfig.from_pretrained(base)
    config.num_labels = len(labels)
    config.id2label, config.label2id = dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if task == "classify" else LlamaForTokenClassification)(config)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base).save_pretrained(directory)
    (directory / "run.json").write_text(json.dumps({"task": task, "base_model": str(base), "method": "full",
                                                    "peft": False, "labels": labels,
                                                    "chat_template_fingerprint": None}))
    return directory


@pytest.fixture(scope="module")
def assets(bpe, tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    base = write_base(bpe, root / "base")
    return {"base": base, "lora": write_run(base, root / "lora", "lora"), "ia3": write_run(base, root / "ia3", "ia3"),
            "soft": write_run(base, root / "soft", "prompt_tuning"),
            "clf": write_classifier(base, root / "clf"),
            "topic": write_head(base, root / "topic", "classify", ["a", "b", "c"], seed=3),
            "tags": write_head(base, root / "tags", "ner", TAGS, seed=4)}


def _engine(assets, names):
    from tunesmith.serve import load_engine

    engine = load_engine(str(assets["base"]), {k: str(assets[k]) for k in names})
    engine.models = {BASE if k == str(assets["base"]) else k: v for k, v in engine.models.items()}  # short name
    return engine


@pytest.fixture(scope="module")
def engine(assets):
    engine = _engine(assets, ["lora", "clf", "topic", "tags"])  # with "lora" the base is a shared PeftModel
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def client(engine):
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app

    with TestClient(create_app(engine, ServeSettings(max_body_bytes=100_000))) as c:
        yield c


def assert_envelope(response, status: int, param=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def chat(client, model=BASE, **body):
    body = {"model": model, "messages": QUESTION, "max_tokens": 10, "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=body)


def reply(client, model=BASE) -> str:
    response = chat(client, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def offline_reply(run) -> str:
    from tunesmith.generation import SamplingParams, generate
    from tunesmith.models import load

    model, tokenizer = load(str(run))
    return generate(model, tokenizer, messages=QUESTION, params=SamplingParams(max_new_tokens=10)).text


def listed(client) -> dict:
    return {m["id"]: m for m in client.get("/v1/models").json()["data"]}


def load(client, name, run, **body):
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(run), **body})


def unload(client, name):
    return client.post("/v1/unload_lora_adapter", json={"lora_name": name})


# -- /classify ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clf", "topic"])
def test_classify_equals_the_runs_offline_predictions(client, assets, name):
    import torch

    from tunesmith.evaluation import evaluate_classification
    from tunesmith.models import load_run

    response = client.post("/classify", json={"model": name, "input": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == name and body["id"].startswith("classify-")
    model, tokenizer, info = load_run(assets[name])
    offline = evaluate_classification(model, tokenizer, [{"text": t, "label": info.labels[0]} for t in TEXTS],
                                      info.labels).predictions
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["label"] for d in body["data"]] == [p["prediction"] for p in offline]
    for text, item in zip(TEXTS, body["data"]):  # the batched scores are each text's own, alone
        with torch.no_grad():
            alone = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0].tolist()
        assert item["probs"] == pytest.approx(alone, abs=1e-5)
        assert item["num_classes"] == len(info.labels) == len(item["probs"])
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


def test_two_heads_on_one_base_answer_differently(client):
    one, two = (client.post("/classify", json={"model": m, "input": "boring"}).json()["data"][0]
                for m in ["clf", "topic"])
    assert (one["num_classes"], two["num_classes"]) == (2, 3)
    assert one["label"] in {"neg", "pos"} and two["label"] in {"a", "b", "c"}


def test_a_string_input_is_one_item(client):
    body = client.post("/classify", json={"model": "clf", "input": TEXTS[0]}).json()
    many = client.post("/classify", json={"model": "clf", "input": TEXTS}).json()
    assert len(body["data"]) == 1 and body["data"][0]["label"] == many["data"][0]["label"]


def test_long_input_is_cut_to_the_models_context(client, assets):
    from tunesmith.evaluation import evaluate_classification
    from tunesmith.models import load_run

    text = "great movie, loved it " * 100
    body = client.post("/classify", json={"model": "clf", "input": text}).json()
    assert body["usage"]["prompt_tokens"] == CONTEXT
    model, tokenizer, info = load_run(assets["clf"])
    offline = evaluate_classification(model, tokenizer, [{"text": text, "label": "neg"}], info.labels,
                                      max_length=CONTEXT)
    assert body["data"][0]["label"] == offline.predictions[0]["prediction"]


def test_ner_labels_each_word_as_offline_and_groups_entities(client, assets):
    from seqeval.metrics.sequence_labeling import get_entities

    from tunesmith.evaluation import evaluate_tagging
    from tunesmith.models import load_run

    texts = ["John  Smith lives in Paris", "What is the capital of France ?"]
    body = client.post("/classify", json={"model": "tags", "input": texts}).json()
    model, tokenizer, _ = load_run(assets["tags"])
    records = [{"tokens": t.split(), "tags": ["O"] * len(t.split())} for t in texts]
    offline = evaluate_tagging(model, tokenizer, records, TAGS).predictions
    entities = 0
    for text, record, expected, item in zip(texts, records, offline, body["data"]):
        assert item["words"] == record["tokens"] and item["labels"] == expected["prediction"]
        assert item["num_classes"] == len(TAGS) and all(0 < s <= 1 for s in item["scores"])
        spans = get_entities(item["labels"])
        assert [e["entity_group"] for e in item["entities"]] == [kind for kind, _, _ in spans]
        for e, (_, a, b) in zip(item["entities"], spans):
            assert text[e["start"]:e["end"]] == e["word"]  # offsets into the text as sent (double space kept)
            assert e["word"].split() == record["tokens"][a:b + 1]
            assert e["score"] == pytest.approx(sum(item["scores"][a:b + 1]) / (b - a + 1))
        entities += len(spans)
    assert entities  # the random head does tag something here, so the grouping is exercised


def test_ner_words_past_the_context_are_o_without_a_score(client, assets):
    from tunesmith.evaluation import evaluate_tagging
    from tunesmith.models import load_run

    words = ("Paris is the capital of France " * 40).split()
    body = client.post("/classify", json={"model": "tags", "input": " ".join(words)}).json()
    item = body["data"][0]
    assert body["usage"]["prompt_tokens"] == CONTEXT and len(item["labels"]) == len(words)
    model, tokenizer, _ = load_run(assets["tags"])
    offline = evaluate_tagging(model, tokenizer, [{"tokens": words, "tags": ["O"] * len(words)}], TAGS,
                               max_length=CONTEXT).predictions[0]
    assert item["labels"] == offline["prediction"]
    assert item["scores"][-1] is None and item["labels"][-1] == "O" and item["scores"][0] is not None


@pytest.mark.parametrize("name", ["topic", "tags"])
def test_eval_and_classify_give_a_text_the_same_labels_and_probabilities(client, assets, name, monkeypatch):
    """`tunesmith eval` on the run and /classify label through one path (heads.py): the probabilities the scorer
    computed for each text, caught where it labels, are the ones /classify answers, and so are the labels."""
    from tunesmith import heads
    from tunesmith.evaluation import evaluate, scorers

    texts = ["John  Smith lives in Paris", "boring", "What is the capital of France ?"]
    label = heads.label_texts if name == "topic" else heads.label_words
    caught = []
    monkeypatch.setattr(scorers, label.__name__, lambda *a, **k: caught.extend(label(*a, **k)) or caught)
    records = ([{"text": t, "label": "a"} for t in texts] if name == "topic" else
               [{"tokens": t.split(), "tags": ["O"] * len(t.split())} for t in texts])
    offline = evaluate(str(assets[name]), records).predictions
    body = client.post("/classify", json={"model": name, "input": texts}).json()["data"]
    assert len(caught) == len(body) == len(offline) == 3
    for scored, item, prediction in zip(caught, body, offline):
        if name == "topic":
            assert item["label"] == scored.label == prediction["prediction"]
            assert item["probs"] == pytest.approx(scored.probs, abs=1e-6) and sum(item["probs"]) == pytest.approx(1)
        else:
            assert item["labels"] == scored.labels == prediction["prediction"]
            assert item["scores"] == pytest.approx(scored.scores, abs=1e-6)
    if name == "tags":  # the random head tags something here, so more than one label is compared
        assert len({tag for item in body for tag in item["labels"]}) > 1


def test_concurrent_requests_share_a_head(client):
    alone = client.post("/classify", json={"model": "tags", "input": TEXTS}).json()["data"]
    threads = [_in_thread(lambda: client.post("/classify", json={"model": m, "input": TEXTS}))
               for m in ["tags", "clf"] * 4]
    for thread, _ in threads:
        thread.join(60)
    assert all(out["value"].status_code == 200 for _, out in threads)
    assert all(out["value"].json()["data"] == alone for _, out in threads[::2])


def test_classify_errors(client):
    def post(body):
        return client.post("/classify", json=body)

    assert assert_envelope(post({"model": "nope", "input": "x"}), 404, "model")["code"] == "model_not_found"
    assert assert_envelope(post({"model": BASE, "input": "x"}), 400, "model")["code"] == "model_not_classifier"
    assert_envelope(post({"model": "lora", "input": "x"}), 400, "model")
    assert_envelope(post({"model": "clf"}), 400, "input")
    assert_envelope(post({"model": "clf", "input": []}), 400, "input")
    assert_envelope(post({"model": "clf", "input": 5}), 400, "input")
    assert_envelope(post({"model": "clf", "input": ["ok", 5]}), 400, "input.1")
    assert "input 1" in assert_envelope(post({"model": "clf", "input": ["ok", ""]}), 400, "input")["message"]
    assert_envelope(post({"model": "tags", "input": "   "}), 400, "input")
    assert_envelope(post({"model": "clf", "input": "x", "temperature": 0}), 400, "temperature")
    assert_envelope(post({"model": "clf", "input": "x" * 200_000}), 413)


# -- loading and unloading while serving ------------------------------------------------------------------------

def test_load_chat_unload(client, assets, engine):
    before = {name: reply(client, name) for name in [BASE, "lora"]}
    response = load(client, "fresh", assets["ia3"])
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'fresh' added successfully."
    assert listed(client)["fresh"]["task"] == "sft" and listed(client)["fresh"]["parent"] == BASE
    assert reply(client, "fresh") == offline_reply(assets["ia3"])
    assert {name: reply(client, name) for name in [BASE, "lora"]} == before  # the served models are untouched
    # The live run sits on the base's own weights: only its adapter is new.
    fresh, shared = engine.models["fresh"].module, engine.models[BASE].module
    assert {p.data_ptr() for n, p in fresh.named_parameters() if "ia3_" not in n} <= \
        {p.data_ptr() for p in shared.parameters()}
    assert engine.models["fresh"].adapter != "fresh"  # peft never sees the user's name

    response = unload(client, "fresh")
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'fresh' removed successfully."
    assert "fresh" not in listed(client)
    assert assert_envelope(chat(client, "fresh"), 404, "model")["code"] == "model_not_found"
    assert {name: reply(client, name) for name in [BASE, "lora"]} == before


@pytest.mark.parametrize("method", ["lora", "soft"])
def test_load_onto_a_base_without_adapters(assets, method):
    from starlette.testclient import TestClient

    from tunesmith.serve import create_app

    plain = _engine(assets, [])
    with TestClient(create_app(plain)) as c:
        before = reply(c)
        assert load(c, "live", assets[method]).status_code == 200
        assert reply(c, "live") == offline_reply(assets[method])
        assert reply(c) == before
        assert unload(c, "live").status_code == 200 and set(listed(c)) == {BASE}
    plain.stop()


def test_a_loaded_head_classifies_at_once(client, assets):
    assert load(client, "clf-live", assets["clf"]).status_code == 200
    assert listed(client)["clf-live"]["task"] == "classify"
    live, served = (client.post("/classify", json={"model": m, "input": TEXTS}).json()["data"]
                    for m in ["clf-live", "clf"])
    assert [d["label"] for d in live] == [d["label"] for d in served]
    assert assert_envelope(chat(client, "clf-live"), 400, "model")["code"] == "model_not_generative"
    assert unload(client, "clf-live").status_code == 200
    assert_envelope(client.post("/classify", json={"model": "clf-live", "input": "x"}), 404, "model")


def test_load_inplace_swaps_the_weights_under_a_name(client, assets, engine):
    assert load(client, "swap", assets["lora"]).status_code == 200
    assert reply(client, "swap") == reply(client, "lora")
    assert_envelope(load(client, "swap", assets["ia3"]), 400, "lora_name")  # as in vLLM: a duplicate is refused
    assert load(client, "swap", assets["ia3"], load_inplace=True).status_code == 200
    assert reply(client, "swap") == offline_reply(assets["ia3"])
    assert list(listed(client)).count("swap") == 1
    assert unload(client, "swap").status_code == 200


def test_load_errors_are_400s_naming_the_field(client, assets, tmp_path):
    def error(response, param, status=400):
        return assert_envelope(response, status, param)["message"]

    assert "does not say which" in error(load(client, "x", tmp_path / "missing"), "lora_path")  # no key
    (tmp_path / "empty").mkdir()
    assert "does not say which" in error(load(client, "x", tmp_path / "empty"), "lora_path")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text((assets["lora"] / "run.json").read_text())  # no weights, no adapter config
    assert "adapter_config.json of" in error(load(client, "x", broken), "lora_path")
    old = write_run(assets["base"], tmp_path / "old", "lora", fingerprint="0123456789abcdef")
    assert "chat template 0123456789abcdef" in error(load(client, "x", old), "lora_path")
    assert "already served" in error(load(client, "lora", assets["lora"]), "lora_name")
    assert "base model" in error(load(client, BASE, assets["lora"]), "lora_name")
    assert "base model" in error(load(client, BASE, assets["lora"], load_inplace=True), "lora_name")
    error(client.post("/v1/load_lora_adapter", json={"lora_name": "x"}), "lora_path")
    error(client.post("/v1/load_lora_adapter", json={"lora_name": "", "lora_path": str(old)}), "lora_name")
    error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(old), "extra": 1}), "extra")
    assert "x" not in listed(client)
    assert "No model named 'nope'" in error(unload(client, "nope"), "lora_name", 404)
    assert "cannot be unloaded" in error(unload(client, BASE), "lora_name")
    assert set(listed(client)) == {BASE, "lora", "clf", "topic", "tags"}


def test_without_a_key_a_load_error_does_not_tell_which_paths_exist(engine, tmp_path):
    """Anyone may call a server without a key: a missing path, a file, a directory without a run and one with
    a broken run.json get the same words; with a key (only its holders may ask) each says what it is."""
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app

    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{nope")
    paths = [tmp_path / name for name in ("missing", "file", "empty", "broken")]

    def messages(client, headers=None) -> list[str]:
        out = []
        for path in paths:
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(path)}, headers=headers)
            out.append(assert_envelope(r, 400, "lora_path")["message"].replace(str(path), "PATH"))
        return out

    with TestClient(create_app(engine, ServeSettings())) as c:
        vague = messages(c)
    with TestClient(create_app(engine, ServeSettings(api_key="sekret"))) as c:
        precise = messages(c, {"Authorization": "Bearer sekret"})
    assert len(set(vague)) == 1 and "does not say which" in vague[0]
    assert precise == ["Adapter 'x': there is no directory PATH.", "Adapter 'x': PATH is not a directory.",
                       "Adapter 'x': PATH is not a finished tunesmith run (no run.json).",
                       "Adapter 'x': PATH: run.json is unreadable (Expecting property name enclosed in double quotes: "
                       "line 1 column 2 (char 1)); train the run again."]


def test_the_api_key_guards_these_routes(engine, assets):
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app

    key = {"Authorization": "Bearer sekret"}
    with TestClient(create_app(engine, ServeSettings(api_key="sekret"))) as c:
        assert_envelope(c.post("/classify", json={"model": "clf", "input": "x"}), 401)
        assert_envelope(load(c, "k", assets["lora"]), 401)
        assert_envelope(unload(c, "lora"), 401)
        assert "k" not in engine.models and "lora" in engine.models
        assert c.post("/classify", json={"model": "clf", "input": "x"}, headers=key).status_code == 200
        body = {"lora_name": "k", "lora_path": str(assets["lora"])}
        assert c.post("/v1/load_lora_adapter", json=body, headers=key).status_code == 200
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "k"}, headers=key).status_code == 200


# -- unloading under load -----------------------------------------------------------------------------------------

def _gate(monkeypatch, module):
    """Hold every forward pass of `module` until `opened` is set; `entered` says one has begun."""
    return gate(monkeypatch, module, "forward")


def _in_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()))
    thread.start()
    return thread, out


def test_unloading_a_model_mid_reply_lets_the_reply_finish(client, assets, engine, monkeypatch):
    expected = offline_reply(assets["ia3"])
    assert load(client, "busy", assets["ia3"]).status_code == 200
    entered, opened = _gate(monkeypatch, engine.models["busy"].module)
    thread, out = _in_thread(lambda: chat(client, "busy"))
    try:
        assert entered.wait(60)  # the reply is being computed now
        assert unload(client, "busy").status_code == 200
        assert "busy" not in listed(client)
        assert_envelope(chat(client, "busy"), 404, "model")
    finally:
        opened.set()
        thread.join(60)
    assert out["value"].status_code == 200, out["value"].text
    assert out["value"].json()["choices"][0]["message"]["content"] == expected


def _queued_behind_a_held_base_reply(client, engine, monkeypatch, name):
    """Hold the engine in a base reply, then send a request for `name`: it waits in the queue until `opened`."""
    entered, opened = _gate(monkeypatch, engine.models[BASE].module)
    threads = [_in_thread(lambda: chat(client, BASE))]
    assert entered.wait(60)
    threads.append(_in_thread(lambda: chat(client, name)))
    deadline = time.monotonic() + 30
    while client.get("/health").json()["queued"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return opened, threads


def test_an_unload_waits_for_requests_queued_for_the_model(client, assets, engine, monkeypatch):
    expected = offline_reply(assets["ia3"])
    assert load(client, "queued", assets["ia3"]).status_code == 200
    opened, threads = _queued_behind_a_held_base_reply(client, engine, monkeypatch, "queued")
    try:
        unloading, answer = _in_thread(lambda: unload(client, "queued"))
        time.sleep(0.5)
        assert unloading.is_alive() and "queued" in listed(client)  # waiting for the queued request
    finally:
        opened.set()
        for thread, _ in threads:
            thread.join(60)
        unloading.join(60)
    assert answer["value"].status_code == 200 and "queued" not in listed(client)
    queued = threads[1][1]["value"]
    assert queued.status_code == 200, queued.text
    assert queued.json()["choices"][0]["message"]["content"] == expected


def test_an_unload_that_cannot_wait_is_refused_and_the_model_stays(client, assets, engine, monkeypatch):
    from tunesmith.serve.routes import adapters as routes

    monkeypatch.setattr(routes, "UNLOAD_WAIT_S", 0.2)
    assert load(client, "stays", assets["lora"]).status_code == 200
    opened, threads = _queued_behind_a_held_base_reply(client, engine, monkeypatch, "stays")
    try:
        error = assert_envelope(unload(client, "stays"), 409, "lora_name")
        assert error["code"] == "model_busy" and "retry" in error["message"]
        assert "stays" in listed(client)
    finally:
        opened.set()
        for thread, _ in threads:
            thread.join(60)
    assert threads[1][1]["value"].status_code == 200
    assert unload(client, "stays").status_code == 200


def test_python_api_adds_and_removes_runs(assets):
    from tunesmith.serve.adapters import NameTaken, NotServed, add_run, remove_run

    plain = _engine(assets, [])
    served = add_run(plain, "live", assets["lora"])
    assert list(plain.models) == [BASE, "live"] and plain.models["live"] is served
    with pytest.raises(NameTaken, match="already served"):
        add_run(plain, "live", assets["ia3"])
    assert add_run(plain, "live", assets["ia3"], replace=True) is plain.models["live"]
    assert remove_run(plain, "live") is not served and list(plain.models) == [BASE]
    with pytest.raises(NotServed):
        remove_run(plain, "live")
    with pytest.raises(NameTaken, match="cannot be unloaded"):
        remove_run(plain, BASE)

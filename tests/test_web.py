"""The web page of `tunesmith serve` (serve/web/, routes/web.py): the page and its files open to all and
loading nothing from elsewhere, the runs/reports API behind the key (no id reaching outside --runs, every bad
input a 4xx envelope), the conversation list, and a stopped stream stopping the generation on the server.
Then the page itself in headless Chromium (Playwright) against a real uvicorn server: send a message and
see it stream, stop it, switch model, completion mode, open a run and a report, phone width, and the feedback
gestures (👍/👎, Edit, "Prefer this one") keeping exactly their records under --feedback; the message box in view
at 1280x900; and the Train view against a server that fine-tunes: upload (a bad file refused with its line), start
a job, its loss curve growing while it trains, "Chat with it" answered by the fine-tuned model, the saved
conversations trained on and a job cancelled mid-run, the feedback files offered, a failed job's reason shown."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serve_assets import CONTEXT, uvicorn_on_loopback, write_base, write_run
from test_feedback import train_on
from test_serve import assert_envelope

BASE = "base"
KEY = "page-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WEB = Path(__file__).resolve().parent.parent / "src" / "tunesmith" / "serve" / "web"


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _log(directory: Path, steps: int, start: float, evals: tuple = ()) -> None:
    lines = [{"step": s, "loss": start / s, "lr": 1e-4, "epoch": s / steps} for s in range(1, steps + 1)]
    for at in evals:
        lines.insert(at, {"step": at, "eval_loss": start / at * 2, "eval_exact_match": 0.5})
    (directory / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 99, "lo',
                                         encoding="utf-8")  # a line half-written by a kill is skipped


@pytest.fixture(scope="module")
def assets(bpe, tmp_path_factory):
    """A base model and a runs directory: a real LoRA run (served as `lora`), a run continued from it, an
    unfinished run, a compare report, and what must not be listed (hidden, symlinked, checkpoints)."""
    root = tmp_path_factory.mktemp("web")
    base = write_base(bpe, root / "base")
    runs = root / "runs"
    lora = write_run(base, runs / "support-lora", "lora")
    info = json.loads((lora / "run.json").read_text())
    _write_json(lora / "run.json", {**info, "parent": None, "lineage": [],
                                    "data": {"train": {"path": "/data/train.jsonl", "examples": 40}, "eval": None}})
    _write_json(lora / "metrics.json", {"before": {"exact_match": 0.1, "loss": 2.5},
                                        "after": {"exact_match": 0.8, "loss": 0.4, "per_label": {"a": 1.0}},
                                        "train": {"train_loss": 0.9, "wall_seconds": 12.0}})
    (lora / "train_config.yaml").write_text("task: sft\nmethod: lora\n", encoding="utf-8")
    _log(lora, 30, 3.0, evals=(15, 30))
    child = runs / "continued" / "step-2" / "run"
    child.mkdir(parents=True)
    parent = {"path": str(lora), "task": "sft", "method": "lora", "base_model": str(base)}
    _write_json(child / "run.json", {**info, "parent": parent, "lineage": [parent]})
    _write_json(child / "metrics.json", {"before": {"exact_match": 0.8, "before_kind": "parent run"},
                                         "after": {"exact_match": 0.9}})
    _log(child, 10, 1.0, evals=(5,))
    unfinished = runs / "still-training"
    (unfinished / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    _log(unfinished, 5, 2.0)
    report = runs / "compare-demo"
    report.mkdir()
    (report / "compare.yaml").write_text("title: Demo\n", encoding="utf-8")
    _write_json(report / "report.json", {"title": "Demo comparison"})
    (report / "report.html").write_text("<!doctype html><title>Demo comparison</title><h1>Demo comparison</h1>"
                                        "<table><tr><td>lora</td><td>0.8</td></tr></table>", encoding="utf-8")
    outside = root / "outside"
    outside.mkdir()
    _write_json(outside / "run.json", {"task": "sft", "method": "secret"})
    (runs / ".hidden").mkdir()
    _write_json(runs / ".hidden" / "run.json", {"task": "sft"})
    (runs / "linked").symlink_to(outside, target_is_directory=True)
    return {"base": base, "runs": runs, "lora": lora, "child": child, "outside": outside}


@pytest.fixture(scope="module")
def engine(assets):
    from tunesmith.serve import load_engine

    engine = load_engine(str(assets["base"]), {"lora": str(assets["lora"])})
    engine.models = {BASE if k == str(assets["base"]) else k: v for k, v in engine.models.items()}
    yield engine
    engine.stop()


@contextmanager
def client_for(engine, **settings):
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app

    with TestClient(create_app(engine, ServeSettings(**settings))) as c:
        yield c


@pytest.fixture(scope="module")
def client(engine, assets):
    with client_for(engine, runs=str(assets["runs"]), api_key=KEY) as c:
        yield c


# -- the page and its files ----------------------------------------------------------------------------------

def test_the_page_and_its_files_need_no_key_and_nothing_else_does(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/web/app.js">' in page.text
    for name in sorted(p.name for p in WEB.iterdir()):
        r = client.get(f"/web/{name}")
        assert r.status_code == 200, name
        kind = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}[Path(name).suffix]
        assert r.headers["content-type"].startswith(kind)  # module scripts need a JavaScript MIME type
    for path in ("/web/nothing.js", "/web/..%2Fapp.py", "/web/%2e%2e%2f%2e%2e%2fapp.py", "/web/"):
        assert_envelope(client.get(path), 404)
    assert client.get("/health").status_code == 200
    for path in ("/v1/runs", "/v1/runs/support-lora", "/v1/reports", "/v1/reports/compare-demo", "/v1/conversations"):
        assert assert_envelope(client.get(path), 401)["code"] == "invalid_api_key", path
        assert client.get(path, headers=AUTH).status_code == 200, path


def test_the_page_fetches_nothing_from_elsewhere():
    """No CDN, no build step: every script, style and module the page names is one of its own files."""
    files = {p.name: p.read_text(encoding="utf-8") for p in WEB.iterdir()}
    assert set(files) == {"index.html", "style.css", "app.js", "api.js", "dom.js", "chart.js", "playground.js",
                          "runs.js", "feedback.js", "train.js", "job.js"}
    for name, text in files.items():
        text = text.replace("http://www.w3.org/2000/svg", "")  # SVG's namespace name, never fetched
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), name
        assert "@import" not in text and "url(" not in text, name
    html = files["index.html"]
    assert {m for m in re.findall(r'(?:src|href)="(/[^"]*)"', html)} == {"/web/style.css", "/web/app.js"}
    for name, text in files.items():
        for module in re.findall(r"from '([^']+)'", text):
            assert module.startswith("./") and module[2:] in files, (name, module)


# -- runs and reports ---------------------------------------------------------------------------------------------

def test_runs_are_listed_with_method_task_base_and_scores(client, assets):
    body = client.get("/v1/runs", headers=AUTH).json()
    assert body["object"] == "list" and body["root"] == str(assets["runs"].resolve())
    runs = {r["id"]: r for r in body["data"]}
    assert set(runs) == {"support-lora", "continued/step-2/run", "still-training"}  # not hidden, linked, outside
    lora = runs["support-lora"]
    assert (lora["status"], lora["task"], lora["method"], lora["base_model"]) == ("finished", "sft", "lora",
                                                                                  str(assets["base"]))
    assert lora["before"] == {"exact_match": 0.1, "loss": 2.5}
    assert lora["after"] == {"exact_match": 0.8, "loss": 0.4}  # per-label dicts are not table cells
    assert runs["continued/step-2/run"]["parent"]["id"] == "support-lora"
    assert runs["still-training"]["status"] == "unfinished" and runs["still-training"]["method"] is None


def test_a_run_opens_with_its_loss_curve_lineage_and_config(client, assets):
    run = client.get("/v1/runs/support-lora", headers=AUTH).json()
    assert run["path"] == str(assets["lora"].resolve()) and run["served_as"] == ["lora"]
    assert run["config"] == "task: sft\nmethod: lora\n"
    assert run["metrics"]["train"] == {"train_loss": 0.9, "wall_seconds": 12.0}
    assert len(run["log"]) == 32 and run["log"][0] == {"step": 1, "loss": 3.0, "lr": 1e-4, "epoch": 1 / 30}
    assert any("eval_loss" in p for p in run["log"])
    assert run["lineage"] == [] and run["children"] == ["continued/step-2/run"]
    child = client.get("/v1/runs/continued/step-2/run", headers=AUTH).json()
    assert child["lineage"] == [{"id": "support-lora", "path": str(assets["lora"]), "task": "sft",
                                 "method": "lora", "base_model": str(assets["base"])}]
    assert child["before_kind"] == "parent run" and child["served_as"] == []
    assert client.get("/v1/runs/continued%2Fstep-2%2Frun", headers=AUTH).json()["id"] == "continued/step-2/run"


def test_a_long_log_is_thinned_to_the_points_a_curve_needs(tmp_path, engine):
    from tunesmith.serve.routes.web import MAX_LOG_POINTS

    run = tmp_path / "long"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 5001)))
    with client_for(engine, runs=str(tmp_path)) as c:
        log = c.get("/v1/runs/long").json()["log"]
    assert len(log) == MAX_LOG_POINTS and log[0]["step"] == 1 and log[-1]["step"] == 5000


def test_a_broken_run_json_shows_the_run_unfinished_never_a_500(tmp_path, engine):
    for name, text in {"half": '{"task": "sft", "base_', "list": "[1, 2]", "partial": '{"task": "sft"}'}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(text, encoding="utf-8")
    _log(tmp_path / "half", 3, 1.0)
    with client_for(engine, runs=str(tmp_path)) as c:
        listed = {r["id"]: r for r in c.get("/v1/runs").json()["data"]}
        assert set(listed) == {"half", "list", "partial"}
        assert {r["status"] for r in listed.values()} == {"unfinished"} and listed["half"]["task"] is None
        run = c.get("/v1/runs/half")
        assert run.status_code == 200 and len(run.json()["log"]) == 3 and run.json()["lineage"] == []


@pytest.mark.parametrize("name", ["../outside", "..%2Foutside", "%2E%2E/outside", "support-lora/../../outside",
                                  "linked", ".hidden", "still-training/checkpoints/checkpoint-5", "nope",
                                  "%2Fetc%2Fpasswd", "support-lora%00", "a" * 5000])
def test_a_run_id_cannot_reach_outside_the_runs_directory(client, name):
    r = client.get(f"/v1/runs/{name}", headers=AUTH)
    assert r.status_code == 404, r.text
    assert_envelope(r, 404)
    assert "secret" not in r.text
    assert_envelope(client.get(f"/v1/reports/{name}", headers=AUTH), 404)


def test_reports_are_listed_and_served_for_a_sandboxed_frame(client):
    reports = client.get("/v1/reports", headers=AUTH).json()["data"]
    assert [(r["id"], r["kind"], r["title"]) for r in reports] == [("compare-demo", "compare", "Demo comparison")]
    r = client.get("/v1/reports/compare-demo", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == "sandbox" and "<h1>Demo comparison</h1>" in r.text


def test_without_runs_the_lists_are_empty_and_a_run_is_a_404(engine, tmp_path):
    from tunesmith.cli import main
    from tunesmith.serve import ServeError, ServeSettings, create_app

    with client_for(engine) as c:
        assert c.get("/v1/runs").json() == {"object": "list", "root": None, "data": []}
        assert c.get("/v1/reports").json() == {"object": "list", "root": None, "data": []}
        assert assert_envelope(c.get("/v1/runs/anything"), 404)["code"] == "runs_not_configured"
        assert "--runs" in assert_envelope(c.get("/v1/reports/anything"), 404)["message"]
    with pytest.raises(ServeError, match="--runs .*missing: no such directory"):
        create_app(engine, ServeSettings(runs=str(tmp_path / "missing")))
    assert main(["serve", "--runs", str(tmp_path / "missing")]) == 2  # refused before any model loads


# -- conversations, listed for the page -------------------------------------------------------------------------

def test_conversations_are_listed_newest_first(engine):
    with client_for(engine) as c:
        assert c.get("/v1/conversations").json() == {"object": "list", "data": []}
        ids = [c.post("/v1/conversations", json={"model": BASE, "metadata": {"title": f"t{i}"}}).json()["id"]
               for i in range(3)]
        listed = c.get("/v1/conversations").json()["data"]
        assert [x["id"] for x in listed] == ids[::-1]
        assert listed[0]["metadata"] == {"title": "t2"} and listed[0]["model"] == BASE
        assert [x["id"] for x in c.get("/v1/conversations?limit=2").json()["data"]] == ids[:0:-1]
        for bad in ("0", "1001", "x"):
            assert_envelope(c.get(f"/v1/conversations?limit={bad}"), 400, "limit")
        c.delete(f"/v1/conversations/{ids[1]}")
        assert [x["id"] for x in c.get("/v1/conversations").json()["data"]] == [ids[2], ids[0]]


# -- training data the server keeps, made into training files (POST /v1/files/import) -----------------------------

def _turns(store, model: str, turns: list, system: str | None = None) -> dict:
    conversation = store.create(model=model, system=system)
    for question, reply in turns:
        store.add_turn(conversation["id"], [{"role": "user", "content": question}], reply)
    return conversation


def test_the_saved_conversations_and_the_feedback_become_training_files(engine, tmp_path):
    from tunesmith.data.formats import KINDS
    from tunesmith.feedback import edit

    with client_for(engine, api_key=KEY, state_dir=str(tmp_path / "state"), feedback=str(tmp_path / "fb")) as c:
        def made(source: str):
            return c.post("/v1/files/import", json={"source": source}, headers=AUTH)

        assert assert_envelope(made("conversations"), 400, "source")["message"] == (
            "No saved conversation has a reply to train on yet: chat in the playground (or send `conversation` with "
            "/v1/chat/completions) first.")
        store = c.app.state.store
        _turns(store, BASE, [("Hi", "Hello."), ("2+2?", "4.")], system="Be brief.")
        store.create(model=BASE)  # no reply yet
        call = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]}
        _turns(store, BASE, [("1+2?", call)])  # the store has no definition of `add`: left out
        _turns(store, "lora", [("Bye", "Goodbye.")])
        kept = made("conversations").json()
        assert (kept["object"], kept["filename"], kept["purpose"], kept["status"]) == (
            "file", "conversations.jsonl", "fine-tune", "processed")
        assert kept["tunesmith"] == {"source": "conversations", "records": 2, "left_out": 2}
        content = c.get(f"/v1/files/{kept['id']}/content", headers=AUTH).text
        assert [json.loads(line) for line in content.splitlines()] == [  # oldest first
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4."}]},
            {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}]
        assert kept["id"] in [f["id"] for f in c.get("/v1/files", headers=AUTH).json()["data"]]

        assert assert_envelope(made("feedback/sft"), 400, "source")["message"] == (
            f"No sft feedback is kept yet: {tmp_path / 'fb' / 'sft.jsonl'} holds no records.")
        c.app.state.feedback.write(edit([{"role": "user", "content": "Where is order 42?"}], "No idea.", "Shipped."))
        sft = made("feedback/sft").json()
        assert (sft["filename"], sft["tunesmith"]) == ("sft.jsonl", {"source": "feedback/sft", "records": 1,
                                                                     "left_out": 0})
        sft_content = c.get(f"/v1/files/{sft['id']}/content", headers=AUTH).content
        assert sft_content == (tmp_path / "fb" / "sft.jsonl").read_bytes()
        pairs = made("feedback/preference")
        if "preference" in KINDS:  # tunesmith reads preference pairs: the file is kept, for a dpo job
            assert pairs.json()["tunesmith"]["records"] == 1
        else:
            assert assert_envelope(pairs, 400, "source")["message"].startswith(
                "preference.jsonl is not valid training data (1 problem; `tunesmith data validate` shows the same): "
                "preference.jsonl:1: ")
        assert_envelope(made("elsewhere"), 400, "source")
    with client_for(engine, api_key=KEY, state_dir=str(tmp_path / "state")) as c:
        error = assert_envelope(c.post("/v1/files/import", json={"source": "feedback/sft"}, headers=AUTH), 404)
        assert error["code"] == "feedback_not_configured"
    with client_for(engine, state_dir=str(tmp_path / "state")) as c:  # no API key: no fine-tuning
        assert assert_envelope(c.post("/v1/files/import", json={"source": "conversations"}), 403)["code"] == (
            "fine_tuning_off")


# -- Stop: a client that hangs up stops the generation --------------------------------------------------------

def slowed(engine, delay: float):
    """An engine of its own over the loaded models whose every decode step takes at least `delay` seconds and
    never ends a reply early (stop tokens banned), and the list of its decode steps' times."""
    from tunesmith.serve import Engine

    slow = Engine(engine.models, engine.tokenizer, context_window=CONTEXT)
    steps, decode, submit = [], slow._decode, slow.submit
    banned = {i: -100.0 for i in engine.tokenizer.all_special_ids}

    def step(key):
        time.sleep(delay)
        decode(key)
        steps.append(time.monotonic())

    def queue(requests):
        for request in requests:
            request.params.logit_bias = {**request.params.logit_bias, **banned}
        submit(requests)

    slow._decode, slow.submit = step, queue
    return slow, steps


def _idle(http, deadline_s: float = 10) -> float:
    start = time.monotonic()
    while any(http.get("/health").json()[k] for k in ("running", "queued")):
        assert time.monotonic() - start < deadline_s, "the generation went on after the client hung up"
        time.sleep(0.01)
    return time.monotonic()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_hanging_up_a_stream_stops_its_generation(engine, path):
    from tunesmith.serve import ServeSettings, create_app

    slow, steps = slowed(engine, 0.02)
    body = {"model": BASE, "max_tokens": 60, "temperature": 0, "stream": True,
            **({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"})}
    with uvicorn_on_loopback(create_app(slow, ServeSettings())) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
                if choices and (choices[0].get("delta", {}).get("content") or choices[0].get("text")):
                    break  # the first generated text: decoding is under way
            hung_up = time.monotonic()
        idle = _idle(http)
        time.sleep(0.2)
        after = sum(t > hung_up for t in steps)
        assert 0 < len(steps) < 30 and after <= 5, (len(steps), after)  # 60 steps take 1.2 s; it stopped at once
        assert idle - hung_up < 1.0
    slow.stop()


# -- in a real browser ----------------------------------------------------------------------------------------------

CHROMIUM = os.environ.get("TUNESMITH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; the system Chromium is used, no browser download)"
    if CHROMIUM is None:
        return "no Chromium to drive (apt-get install -y chromium, or set TUNESMITH_CHROMIUM)"
    return None


browser_test = pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")


@pytest.fixture(scope="module")
def server(engine, assets, tmp_path_factory):
    """A real uvicorn server with the API key, --runs, --feedback, and an engine slow enough (30 ms a token, no
    early stop) that a reply is still streaming when the test looks, or presses Stop."""
    from tunesmith.serve import ServeSettings, create_app

    slow, steps = slowed(engine, 0.03)
    seen = []
    queue = slow.submit
    slow.submit = lambda requests: (seen.extend(r.model for r in requests), queue(requests))
    app = create_app(slow, ServeSettings(api_key=KEY, runs=str(assets["runs"]),
                                         feedback=str(tmp_path_factory.mktemp("feedback"))))
    with uvicorn_on_loopback(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        yield {"url": url, "http": http, "steps": steps, "models": seen, "app": app}
    slow.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@contextmanager
def _browsing(browser, url: str, models: int):
    """The page at `url` opened at 1280x900, the API key typed into the dialog it asks with, at least `models`
    models loaded; no script error and no CSP refusal by the end."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))  # our own CSP
    page.goto(url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    page.fill("#key-input", KEY)
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.querySelectorAll('[data-pane=\"0\"] select option').length >= {models}")
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser, server):
    with _browsing(browser, server["url"], 2) as page:
        yield page


def _settings(page, max_tokens: int, compare: bool):
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))
    page.set_checked("#compare", compare)


def _send(page, text: str):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def _reply(pane: int) -> str:
    """The selector of the pane's replies (a chat reply or a completion)."""
    return f'[data-pane="{pane}"] :is(.msg.assistant, .msg.completion)'


@browser_test
def test_browser_a_reply_streams_into_both_panes_and_is_kept(page, server):
    assert page.locator('[data-pane="0"] select').input_value() == BASE  # base beside the run by default
    assert page.locator('[data-pane="1"] select').input_value() == "lora"
    _settings(page, 20, compare=True)
    _send(page, "Hello")
    # mid-stream: some text is there, the reply is still streaming and busy for screen readers
    page.wait_for_function(f"""() => {{ const m = document.querySelector('{_reply(0)}');
        return m && m.dataset.state === 'streaming' && m.getAttribute('aria-busy') === 'true'
               && m.querySelector('.body').textContent.length > 0; }}""")
    for pane in (0, 1):
        page.locator(f'{_reply(pane)}[data-state="done"]').wait_for()
    assert page.locator('[data-pane="0"] .transcript').get_attribute("role") == "log"
    shown = page.locator(f"{_reply(0)} .body").text_content()
    listed = server["http"].get("/v1/conversations").json()["data"]
    mine = [c for c in listed if c["metadata"].get("title") == "Hello"]
    assert {c["model"] for c in mine} == {BASE, "lora"}
    base_conv = next(c for c in mine if c["model"] == BASE)
    stored = server["http"].get(f"/v1/conversations/{base_conv['id']}/messages").json()["data"]
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[1]["content"] == shown
    page.locator("#conversation-list li").first.wait_for()
    with page.expect_download() as download:
        page.click('[data-pane="0"] .save')
    record = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert record == {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant",
                                                                          "content": stored[1]["content"]}]}


@browser_test
def test_browser_stop_ends_the_stream_and_the_generation(page, server):
    from playwright.sync_api import expect

    _settings(page, 60, compare=True)
    _send(page, "Stop me")
    page.wait_for_function(f"() => document.querySelector('{_reply(1)} .body')?.textContent.length > 0")
    page.click("#stop")
    stopped = time.monotonic()
    for pane in (0, 1):
        page.locator(f'{_reply(pane)}[data-state="stopped"]').wait_for()
    idle = _idle(server["http"])
    assert idle - stopped < 1.0  # 60 tokens take 1.8 s
    assert sum(t > stopped for t in server["steps"]) <= 5
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()

    def titles():
        return [c["metadata"].get("title") for c in server["http"].get("/v1/conversations").json()["data"]]
    deadline = time.monotonic() + 5
    while "Stop me" in titles():  # nothing was kept, so no empty conversation is left behind
        assert time.monotonic() < deadline, titles()
        time.sleep(0.05)


@browser_test
def test_browser_switching_the_model_sends_to_the_new_one(page, server):
    _settings(page, 4, compare=False)
    assert page.locator('[data-pane="1"]').is_hidden()
    page.select_option('[data-pane="0"] select', "lora")
    before = len(server["models"])
    _send(page, "Who are you?")
    page.locator(f'{_reply(0)}[data-state="done"]').wait_for()
    assert server["models"][before:] == ["lora"]
    assert page.locator(f"{_reply(0)} .who").inner_text() == "assistant · lora"


@browser_test
def test_browser_completion_mode_sends_the_raw_prompt(page, server):
    _settings(page, 6, compare=False)
    page.check('input[name="mode"][value="completion"]')
    assert page.locator("#prompt-label").inner_text() == "Prompt" and page.locator("#system").is_hidden()
    _send(page, "Q: 2+2?\nA:")
    page.locator(f'{_reply(0)}[data-state="done"]').wait_for()
    expected = server["http"].post("/v1/completions", json={"model": BASE, "prompt": "Q: 2+2?\nA:", "max_tokens": 6,
                                                            "temperature": 0}).json()["choices"][0]["text"]
    assert page.locator(f"{_reply(0)} .completion").text_content() == expected
    assert page.locator(f"{_reply(0)} .prompt").text_content() == "Q: 2+2?\nA:"


@browser_test
def test_browser_a_run_opens_with_curve_lineage_and_its_report(page, server):
    page.click("#tab-runs")
    page.locator('tr[data-run="continued/step-2/run"]').wait_for()
    assert page.locator("#runs-table tbody tr").count() == 3
    page.click('tr[data-run="continued/step-2/run"] a')
    detail = page.locator("#run-detail article.run")
    detail.wait_for()
    assert detail.locator("h2").inner_text() == "continued/step-2/run"
    facts = dict(zip(detail.locator("dl.facts dt").all_inner_texts(), detail.locator("dl.facts dd").all_inner_texts()))
    assert facts["method"] == "lora" and facts["directory"].endswith("continued/step-2/run")
    assert detail.locator("svg.chart polyline").count() == 1  # train loss; one eval point is a dot
    assert "before (parent run)" in detail.locator("table.scores").inner_text()
    detail.locator("ol.lineage a", has_text="support-lora").click()
    page.locator('#run-detail article.run[data-run="support-lora"]').wait_for()
    assert page.locator("#run-detail svg.chart polyline").count() == 2  # train and eval loss
    assert "continued/step-2/run" in page.locator("#run-detail").inner_text()
    page.click("#reports-list a")
    frame = page.frame_locator("#run-detail iframe.report")
    assert frame.locator("h1").inner_text() == "Demo comparison"
    assert page.locator("#run-detail iframe.report").get_attribute("sandbox") == ""
    page.goto(server["url"] + "/#runs/support-lora")
    page.click("button.chat-with")
    page.wait_for_function("() => location.hash === '#playground'")
    assert page.locator('[data-pane="1"] select').input_value() == "lora"
    page.wait_for_timeout(100)  # the hashchange event comes after: it must not take the focus away
    assert page.evaluate("document.activeElement.id") == "prompt"


@browser_test
def test_browser_fits_a_phone(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    page.add_init_script(f"sessionStorage.setItem('tunesmith-api-key', {json.dumps(KEY)})")
    for hash_ in ("#playground", "#train", "#runs/support-lora"):
        page.goto(server["url"] + "/" + hash_)
        page.wait_for_load_state("networkidle")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, hash_
    assert page.locator("#key-dialog").is_hidden()  # the key kept for the tab is used without asking
    context.close()



# -- feedback from the page: each gesture keeps exactly its records ------------------------------------------------

@pytest.fixture
def feedback(server, tmp_path):
    """A feedback directory of this test's own for the server to keep the page's gestures in."""
    from tunesmith.feedback import FeedbackLog

    kept = server["app"].state.feedback
    server["app"].state.feedback = FeedbackLog(tmp_path / "feedback")
    yield tmp_path / "feedback"
    server["app"].state.feedback = kept


def _kept(directory: Path) -> dict[str, list[dict]]:
    """{file name: its records} of the files the server wrote."""
    return {p.name: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
            for p in sorted(directory.iterdir())}


def _said(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _chat_turn(page, text: str, count: int, panes=(0,)) -> list[str]:
    """Send `text`; each pane's reply text once the `count`th reply of each is done."""
    _send(page, text)
    for pane in panes:
        page.locator(f'{_reply(pane)}[data-state="done"] >> nth={count - 1}').wait_for()
    return [page.locator(f"{_reply(pane)} .body").nth(count - 1).text_content() for pane in panes]


@browser_test
def test_browser_thumbs_keep_kto_records_of_the_conversation(page, feedback):
    from playwright.sync_api import expect

    _settings(page, 6, compare=False)
    page.fill("#system", "Be brief.")
    (first,) = _chat_turn(page, "Hello", 1)
    reply = page.locator(_reply(0)).first
    reply.locator(".feedback .good").click()
    expect(reply.locator(".good")).to_have_attribute("aria-pressed", "true")
    expect(reply.locator(".bad")).to_be_disabled()  # one thumb a reply
    expect(page.locator("#notice")).to_have_text("Kept as training data: kto.jsonl.")
    (second,) = _chat_turn(page, "Again", 2)
    page.locator(_reply(0)).nth(1).locator(".feedback .bad").click()
    expect(page.locator(_reply(0)).nth(1).locator(".bad")).to_have_attribute("aria-pressed", "true")
    system, hello = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}
    assert _kept(feedback) == {"kto.jsonl": [
        {"prompt": [system, hello], "completion": _said(first), "label": True},
        {"prompt": [system, hello, *_said(first), {"role": "user", "content": "Again"}], "completion": _said(second),
         "label": False}]}


@browser_test
def test_browser_an_edit_keeps_the_correction_and_the_pair_over_the_original(page, feedback):
    from playwright.sync_api import expect

    from tunesmith.data.formats import validate

    _settings(page, 6, compare=False)
    (original,) = _chat_turn(page, "Where is order 42?", 1)
    reply = page.locator(_reply(0)).first
    reply.locator(".feedback .edit").click()
    box = reply.locator("form.correct textarea")
    expect(box).to_be_focused()
    assert box.input_value() == original  # the correction starts from the reply
    box.fill('{"order": 42, "status": "shipped"}')
    reply.locator(".save-correction").click()
    expect(reply.locator(".correction .text")).to_have_text('{"order": 42, "status": "shipped"}')
    expect(reply.locator(".edit")).to_be_disabled()
    assert reply.locator(".body").text_content() == original  # what the conversation goes on from is unchanged
    prompt = [{"role": "user", "content": "Where is order 42?"}]
    corrected = _said('{"order": 42, "status": "shipped"}')
    assert _kept(feedback) == {"preference.jsonl": [{"prompt": prompt, "chosen": corrected,
                                                     "rejected": _said(original)}],
                               "sft.jsonl": [{"messages": prompt + corrected}]}
    report = validate(str(feedback / "sft.jsonl"))  # the correction is chat data as it is
    assert not report.problems and (report.kind, report.count) == ("chat", 1)


@browser_test
def test_browser_prefer_this_one_keeps_a_pair_of_the_two_panes(page, feedback):
    from playwright.sync_api import expect

    _settings(page, 6, compare=True)
    base, lora = _chat_turn(page, "Hello", 1, panes=(0, 1))
    assert base != lora  # the run really answers otherwise
    page.locator(f'[data-pane="1"] .prefer').click()
    expect(page.locator('[data-pane="1"] .prefer')).to_have_text("Preferred")
    expect(page.locator('[data-pane="0"] .prefer')).to_be_disabled()
    assert _kept(feedback) == {"preference.jsonl": [{"prompt": [{"role": "user", "content": "Hello"}],
                                                     "chosen": _said(lora), "rejected": _said(base)}]}


@browser_test
def test_browser_a_reopened_conversation_takes_feedback_on_its_earlier_replies(page, server, feedback):
    from playwright.sync_api import expect

    http = server["http"]
    cid = http.post("/v1/conversations", json={"model": BASE, "system": "Be brief.",
                                               "metadata": {"title": "Reopened"}}).json()["id"]
    said = [http.post("/v1/chat/completions", json={"model": BASE, "conversation": cid, "max_tokens": 3,
                                                    "messages": [{"role": "user", "content": q}]}
                      ).json()["choices"][0]["message"]["content"] for q in ("First?", "Second?")]
    page.click("#refresh-conversations")
    page.locator("#conversation-list button.open", has_text="Reopened").click()
    page.locator(f"{_reply(0)} >> nth=1").wait_for()
    page.locator(_reply(0)).nth(1).locator(".bad").click()
    expect(page.locator(_reply(0)).nth(1).locator(".bad")).to_have_attribute("aria-pressed", "true")
    assert _kept(feedback) == {"kto.jsonl": [{"prompt": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "First?"}, *_said(said[0]),
        {"role": "user", "content": "Second?"}], "completion": _said(said[1]), "label": False}]}


@browser_test
def test_browser_without_feedback_no_reply_offers_it(page, server):
    kept = server["app"].state.feedback
    server["app"].state.feedback = None
    try:
        page.reload()  # the key kept for the tab is used without asking
        page.wait_for_function("() => document.querySelectorAll('[data-pane=\"0\"] select option').length === 2")
        _settings(page, 4, compare=True)
        _chat_turn(page, "Hello", 1, panes=(0, 1))
        assert page.locator(".feedback, .prefer").count() == 0
    finally:
        server["app"].state.feedback = kept


@browser_test
def test_browser_the_pairs_the_page_keeps_train_with_dpo_as_they_are(page, feedback, model_dir, tmp_path):
    """Edits and side-by-side choices over three turns, then `tunesmith train` on the page's preference.jsonl
    with `objective: dpo`, the file untouched."""
    _settings(page, 6, compare=True)
    for turn, text in enumerate(["Hello", "Where is order 42?", "Thanks"], 1):
        _chat_turn(page, text, turn, panes=(0, 1))
        page.locator('[data-pane="0"] .prefer').nth(turn - 1).click()
        reply = page.locator(_reply(1)).nth(turn - 1)
        reply.locator(".edit").click()
        reply.locator("form.correct textarea").fill(f"Answer {turn}.")
        reply.locator(".save-correction").click()
        reply.locator(".correction").wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('.prefer')].every((b) => b.disabled)")
    assert len(_kept(feedback)["preference.jsonl"]) == 6
    assert train_on(tmp_path, model_dir, feedback / "preference.jsonl", task="preference",
                    preference={"objective": "dpo"}) == 0


# -- the playground as a chat page: the message box stays in view -------------------------------------------------

IN_VIEW = """() => ['#prompt', '#send'].map((selector) => {
    const box = document.querySelector(selector).getBoundingClientRect();
    return box.height > 0 && box.top >= 0 && box.bottom <= innerHeight && box.left >= 0 && box.right <= innerWidth;
})"""
NO_SCROLL = "() => [scrollY, document.documentElement.scrollHeight - innerHeight]"


@browser_test
def test_browser_the_message_box_and_send_are_in_view_at_1280x900(page, server):
    """A new user's first look at 1280x900: the message box and Send are on screen without scrolling, and stay
    there when a long conversation fills the panes (the transcripts scroll, never the page)."""
    assert page.viewport_size == {"width": 1280, "height": 900}
    assert page.evaluate(IN_VIEW) == [True, True]
    assert page.evaluate(NO_SCROLL) == [0, 0]
    store = server["app"].state.store
    long = store.create(model=BASE, metadata={"title": "A long one"})
    for i in range(12):
        store.add_turn(long["id"], [{"role": "user", "content": f"Question {i}?"}], f"Answer {i}. " * 40)
    page.click("#refresh-conversations")
    page.locator("#conversation-list button.open", has_text="A long one").click()
    page.locator(f"{_reply(0)} >> nth=11").wait_for()
    assert page.evaluate(IN_VIEW) == [True, True]
    assert page.evaluate(NO_SCROLL) == [0, 0]
    transcript = page.evaluate("""() => { const t = document.querySelector('[data-pane="0"] .transcript');
        return [t.scrollHeight > 2 * t.clientHeight, t.scrollTop + t.clientHeight >= t.scrollHeight - 1]; }""")
    assert transcript == [True, True]  # it scrolls, and shows the newest turn
    store.delete(long["id"])


# -- the Train view: a job from the page, its curve growing, chat with the result ---------------------------------

CHAT = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(16)]
# A checkpoint at every step makes a step of the tiny model take ~0.2 s on a CPU, so the curve grows over
# several of the page's looks at the job (one a second) instead of arriving whole.
SLOW_STEPS = {"logging_steps": 1, "save_steps": 1, "evaluate_before": False, "data": {"eval_fraction": 0}}
STEPS = 16
CURVE = """() => { window.curve = [];  // the train-loss points drawn, each time the chart changes
    new MutationObserver(() => {
        const line = document.querySelector('#job-detail svg.chart .series-train');
        const drawn = !line ? 0 : line.tagName === 'circle' ? 1 : line.getAttribute('points').split(' ').length;
        if (drawn && drawn !== window.curve.at(-1)) window.curve.push(drawn);
    }).observe(document.getElementById('job-detail'), { childList: true, subtree: true }); }"""


@pytest.fixture(scope="module")
def tuner(assets, tmp_path_factory):
    """A real uvicorn server that fine-tunes (API key, --state-dir, --feedback) over an engine of its own that
    serves the base model alone: the jobs' models are added to it as they succeed."""
    from tunesmith.serve import ServeSettings, create_app, load_engine

    root = tmp_path_factory.mktemp("tuner")
    engine = load_engine(str(assets["base"]))
    app = create_app(engine, ServeSettings(api_key=KEY, state_dir=str(root / "state"), feedback=str(root / "fb")))
    with uvicorn_on_loopback(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        yield {"url": url, "http": http, "app": app, "base": str(assets["base"])}
    engine.stop()


@pytest.fixture
def tuned_page(browser, tuner):
    with _browsing(browser, tuner["url"], 1) as page:
        page.click("#tab-train")
        page.locator("#train-form").wait_for()
        yield page


def _started(page, tuner) -> dict:
    """The job the page started (its hash is #train/ID)."""
    page.wait_for_function("() => location.hash.startsWith('#train/ftjob-')")
    return tuner["http"].get(f"/v1/fine_tuning/jobs/{page.evaluate('location.hash.slice(7)')}").json()


@browser_test
def test_browser_train_from_an_upload_watch_the_curve_grow_and_chat_with_the_result(tuned_page, tuner, tmp_path):
    from playwright.sync_api import expect

    page, http = tuned_page, tuner["http"]
    expect(page.locator("#train-title")).to_be_focused()
    expect(page.locator("#train-file")).to_have_text("No file uploaded yet")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT[0]) + '\n{"messages": [{"role": "user"}]}\n', encoding="utf-8")
    page.set_input_files("#upload", str(bad))
    expect(page.locator("#upload-error")).to_contain_text(
        "bad.jsonl is not valid training data (1 problem; `tunesmith data validate` shows the same): bad.jsonl:2: ")
    good = tmp_path / "chat.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in CHAT), encoding="utf-8")
    page.set_input_files("#upload", str(good))
    expect(page.locator("#upload-status")).to_have_text(re.compile(r"^Kept chat\.jsonl as file-[0-9a-f]+\.$"))
    expect(page.locator("#upload-error")).to_have_text("")
    (uploaded,) = http.get("/v1/files").json()["data"]  # the refused file was not kept
    assert page.locator("#train-file").input_value() == uploaded["id"]

    page.fill("#train-steps", str(STEPS))
    page.fill("#train-lr", "2")
    page.fill("#train-suffix", "page")
    page.click(".more summary")
    page.fill("#train-config", json.dumps(SLOW_STEPS))
    page.evaluate(CURVE)
    page.click("#train-start")
    job = _started(page, tuner)
    assert (job["model"], job["training_file"], job["user_provided_suffix"]) == (tuner["base"], uploaded["id"], "page")
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": 2}}}
    assert job["tunesmith"]["config"] == {**SLOW_STEPS, "max_steps": STEPS}
    page.locator('#job-detail article.job[data-status="succeeded"]').wait_for(timeout=120_000)

    curve = page.evaluate("window.curve")
    # The curve is drawn from the job's events and only ever grows. Whether the page also caught a partial curve
    # depends on the machine's load (a loaded fresh-clone CI run saw only the final [16]), so it is not asserted.
    assert curve[-1] == STEPS and curve == sorted(curve), curve
    events = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
    assert page.locator("#job-detail .events li span").all_inner_texts() == [e["message"] for e in reversed(events)]
    fine_tuned = f"ft:base:page:{job['id']}"
    assert events[1]["message"] == f"New fine-tuned model created: {fine_tuned}"
    expect(page.locator("#job-detail .job-status")).to_have_text("Status: succeeded")
    expect(page.locator(f'#job-list li[data-job="{job["id"]}"] .badge')).to_have_text("succeeded")
    assert page.locator("#job-detail button.cancel").count() == 0

    page.click("#job-detail button.chat-with")
    page.wait_for_function("() => location.hash === '#playground'")
    assert page.locator('[data-pane="0"] select').input_value() == tuner["base"]
    assert page.locator('[data-pane="1"] select').input_value() == fine_tuned
    _settings(page, 4, compare=True)
    _, reply = _chat_turn(page, "What is 3+3?", 1, panes=(0, 1))
    assert page.locator(f"{_reply(1)} .who").inner_text() == f"assistant · {fine_tuned}"
    (conversation,) = [c for c in http.get("/v1/conversations").json()["data"] if c["model"] == fine_tuned]
    stored = http.get(f"/v1/conversations/{conversation['id']}/messages").json()["data"]
    assert [(m["role"], m["content"]) for m in stored] == [("user", "What is 3+3?"), ("assistant", reply)]


@browser_test
def test_browser_train_on_the_saved_conversations_and_cancel_mid_run(tuned_page, tuner):
    from playwright.sync_api import expect
    from test_fine_tuning import trainers, wait_for

    from tunesmith.serve.routes.files import conversation_records

    page, http, store = tuned_page, tuner["http"], tuner["app"].state.store
    for i in range(3):
        _turns(store, tuner["base"], [(f"Question {i}?", f"Answer {i}.")])
    count = len(store.recent(1000))
    page.evaluate("location.hash = '#playground'")
    page.click("#tab-train")  # the view reads what the server keeps each time it opens
    expect(page.locator("#count-conversations")).to_have_text(f"({count})")
    page.check('input[name="source"][value="conversations"]')
    page.fill("#train-steps", "500")
    page.click(".more summary")
    page.fill("#train-config", json.dumps(SLOW_STEPS))
    page.click("#train-start")
    job = _started(page, tuner)
    kept = http.get(f"/v1/files/{job['training_file']}").json()
    assert kept["filename"] == "conversations.jsonl"
    content = http.get(f"/v1/files/{job['training_file']}/content").text
    assert [json.loads(line) for line in content.splitlines()] == conversation_records(store)[0]
    page.locator("#job-detail svg.chart").wait_for(timeout=60_000)  # training: its first steps are drawn
    page.click("#job-detail button.cancel")
    expect(page.locator("#job-detail .job-status")).to_have_text("Status: cancelled")
    expect(page.locator("#notice")).to_have_text(f"Cancelled {job['id']}.")
    assert page.locator("#job-detail button.cancel").count() == 0
    assert http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
    config = Path(job["tunesmith"]["run"]).parent / "config.yaml"
    wait_for(lambda: not trainers(config), "the trainer to end", timeout=30)
    assert page.locator("#job-detail .events li span").last.inner_text() == "The job was cancelled"


@browser_test
def test_browser_the_feedback_files_are_offered_once_they_hold_records(tuned_page, tuner):
    from playwright.sync_api import expect

    from tunesmith.data.formats import KINDS
    from tunesmith.feedback import edit

    page = tuned_page
    for kind in ("sft", "preference"):
        expect(page.locator(f"#source-{kind}")).to_be_hidden()
    tuner["app"].state.feedback.write(edit([{"role": "user", "content": "Where is order 42?"}], "No idea.", "Shipped."))
    page.evaluate("location.hash = '#playground'")
    page.click("#tab-train")
    page.check('input[name="source"][value="feedback/sft"]')
    assert page.locator('input[name="method"]:checked').input_value() == "supervised"
    expect(page.locator("#train-beta")).to_be_hidden()
    page.check('input[name="source"][value="feedback/preference"]')
    assert page.locator('input[name="method"]:checked').input_value() == "dpo"
    expect(page.locator("#train-beta")).to_be_visible()
    page.fill("#train-steps", "1")
    page.click("#train-start")
    if "preference" in KINDS:  # tunesmith reads preference pairs: a dpo job starts
        job = _started(page, tuner)
        assert job["method"]["type"] == "dpo"
        tuner["http"].post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    else:  # the refusal is said where the job would have started
        expect(page.locator("#train-error")).to_contain_text(
            "preference.jsonl is not valid training data (1 problem; `tunesmith data validate` shows the same): "
            "preference.jsonl:1: ")


@browser_test
def test_browser_the_train_view_says_how_to_turn_fine_tuning_on(page):
    from playwright.sync_api import expect

    page.click("#tab-train")
    expect(page.locator("#train-off")).to_have_text("Fine-tuning needs a directory for its files and jobs: start the "
                                                    "server with --state-dir DIR (ServeSettings.state_dir in Python).")
    for part in ("#train-form", "#train-jobs", "#job-detail"):
        expect(page.locator(part)).to_be_hidden()


@browser_test
def test_browser_a_job_that_fails_says_why(tuned_page, tuner):
    """A dpo job, while tunesmith has no preference training, fails at validation: the page shows its sentence."""
    from playwright.sync_api import expect

    from tunesmith.config import TrainConfig

    page, http = tuned_page, tuner["http"]
    kept = http.post("/v1/files", data={"purpose": "fine-tune"},
                     files={"file": ("tiny.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT[:4]))}).json()
    page.evaluate("location.hash = '#playground'")
    page.click("#tab-train")
    page.select_option("#train-file", kept["id"])
    page.check('input[name="method"][value="dpo"]')
    page.fill("#train-beta", "0.2")
    page.fill("#train-steps", "1")
    page.click("#train-start")
    job = _started(page, tuner)
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    page.locator('#job-detail article.job[data-status="failed"]').wait_for(timeout=60_000)
    said = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["error"]["message"]
    expect(page.locator("#job-detail .error")).to_have_text(said)
    if "preference" not in TrainConfig.model_fields["task"].annotation.__args__:
        assert said.startswith("method dpo trains with `task: preference, objective: dpo`, which this tunesmith's "
                               "training config does not accept yet")
    expect(page.locator(f'#job-list li[data-job="{job["id"]}"] .badge')).to_have_text("failed")

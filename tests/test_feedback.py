"""Feedback kept as training data (tunesmith/feedback.py, serve/routes/feedback.py): each gesture's exact
records in TRL's conversational shapes, the log that only ever appends whole lines (threads and processes at
once, a crash's unfinished line repaired), POST/GET /v1/feedback behind the key with every bad input a 4xx
envelope, and the files it writes training as they are: sft.jsonl as chat data, preference.jsonl with
`preference: {objective: dpo}` and kto.jsonl with `preference: {objective: kto}`."""

from __future__ import annotations

import json
import multiprocessing
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
from serve_assets import uvicorn_on_loopback
from test_serve import assert_envelope

from tunesmith.feedback import FILES, FeedbackError, FeedbackLog, choice, edit, thumbs

KEY = "feedback-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Where is order 42?"}]
GOOD, BAD = '{"status": "shipped"}', "Your order is probably on its way somewhere."


def _reply(text):
    return [{"role": "assistant", "content": text}]


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- the records -----------------------------------------------------------------------------------------------

def test_each_gesture_makes_trl_conversational_records():
    assert thumbs(PROMPT, GOOD, True) == [("kto", {"prompt": PROMPT, "completion": _reply(GOOD), "label": True})]
    assert thumbs(PROMPT, BAD, False) == [("kto", {"prompt": PROMPT, "completion": _reply(BAD), "label": False})]
    assert choice(PROMPT, GOOD, BAD) == [("preference", {"prompt": PROMPT, "chosen": _reply(GOOD),
                                                         "rejected": _reply(BAD)})]
    assert edit(PROMPT, BAD, GOOD) == [("sft", {"messages": PROMPT + _reply(GOOD)}),
                                       ("preference", {"prompt": PROMPT, "chosen": _reply(GOOD),
                                                       "rejected": _reply(BAD)})]
    assert edit(PROMPT, "", GOOD) == [("sft", {"messages": PROMPT + _reply(GOOD)})]  # no pair with nothing


def test_the_prompt_keeps_role_and_content_only():
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello", "reasoning_content": "be nice", "weight": 1},
               {"role": "user", "content": "Order 42?"}]
    (_, record), = thumbs(history, GOOD, True)
    assert record["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                {"role": "user", "content": "Order 42?"}]


@pytest.mark.parametrize("make, args, param, message", [
    (thumbs, ([], GOOD, True), "prompt", "prompt is empty"),
    (thumbs, (PROMPT[:1], GOOD, True), "prompt.0.role", "must end with the user's turn that the reply answers "
                                                          "(it ends with system)"),
    (thumbs, ([{"role": "tool", "content": "x"}], GOOD, True), "prompt.0", "must be a system, user, assistant"),
    (thumbs, (PROMPT, " \n", True), "reply", "reply is empty"),
    (choice, (PROMPT, GOOD, GOOD), "rejected", "chosen and rejected are the same reply"),
    (choice, (PROMPT, "", BAD), "chosen", "chosen is empty"),
    (edit, (PROMPT, BAD, BAD), "corrected", "the corrected reply is the same as the original"),
    (edit, (PROMPT, BAD, ""), "corrected", "corrected is empty"),
])
def test_feedback_that_would_not_train_is_refused_by_name(make, args, param, message):
    with pytest.raises(FeedbackError, match=re.escape(message)) as err:
        make(*args)
    assert err.value.param == param


# -- the log -----------------------------------------------------------------------------------------------------

def test_the_log_appends_one_line_per_record_and_never_rewrites(tmp_path):
    mine = '{"prompt": [{"role": "user", "content": "kept"}], "chosen": [], "rejected": []}\n'
    (tmp_path / "preference.jsonl").write_text(mine, encoding="utf-8")  # a line the user already had
    log = FeedbackLog(tmp_path)
    written = log.write(edit(PROMPT, BAD, GOOD))
    assert [(w["kind"], w["file"]) for w in written] == [("sft", "sft.jsonl"), ("preference", "preference.jsonl")]
    log.write(thumbs(PROMPT, BAD, False))
    text = (tmp_path / "preference.jsonl").read_text(encoding="utf-8")
    assert text.startswith(mine) and text.count("\n") == 2
    assert _lines(tmp_path / "preference.jsonl")[1] == edit(PROMPT, BAD, GOOD)[1][1]
    assert _lines(tmp_path / "sft.jsonl") == [{"messages": PROMPT + _reply(GOOD)}]
    assert _lines(tmp_path / "kto.jsonl") == [{"prompt": PROMPT, "completion": _reply(BAD), "label": False}]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES.values())
    assert [(e["kind"], e["line"]) for e in log.read()] == [("sft", 1), ("preference", 1), ("preference", 2),
                                                            ("kto", 1)]
    assert [e["line"] for e in log.read("preference", limit=1)] == [2]


def test_a_line_a_crash_left_unfinished_is_closed_before_the_next_one(tmp_path):
    (tmp_path / "kto.jsonl").write_text('{"prompt": [{"role": "user", "conte', encoding="utf-8")
    log = FeedbackLog(tmp_path)
    log.write(thumbs(PROMPT, GOOD, True))
    lines = (tmp_path / "kto.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[0] == '{"prompt": [{"role": "user", "conte' and json.loads(lines[1])["label"] is True
    assert [(e["line"], e["record"]["label"]) for e in log.read("kto")] == [(2, True)]  # the torn line skipped


def test_the_log_refuses_a_file_for_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FeedbackError, match="is a file; give a directory"):
        FeedbackLog(tmp_path / "f")
    FeedbackLog(tmp_path / "new" / "dir")  # made, parents too
    assert (tmp_path / "new" / "dir").is_dir()


def _write_many(directory, start, count):
    log = FeedbackLog(directory)
    for i in range(start, start + count):
        log.write(thumbs(PROMPT, f"reply {i} " + "x" * 5000, i % 2 == 0))  # lines far over a pipe's atomic size


def test_threads_and_processes_appending_at_once_leave_whole_lines(tmp_path):
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_write_many, args=(tmp_path, 1000 * (p + 1), 20)) for p in range(2)]
    for proc in procs:
        proc.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda t: _write_many(tmp_path, 100 * t, 20), range(4)))
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    replies = [r["completion"][0]["content"].split()[1] for r in _lines(tmp_path / "kto.jsonl")]
    expected = [str(s + i) for s in (0, 100, 200, 300, 1000, 2000) for i in range(20)]
    assert sorted(replies) == sorted(expected)


# -- the routes --------------------------------------------------------------------------------------------------

@contextmanager
def app_client(tokenizer, **settings):
    """The app over an engine that never generates (the feedback routes need none), in-process."""
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app

    idle = SimpleNamespace(tokenizer=tokenizer, chat_template=None, context_window=256, models={},
                           start=lambda: None, stop=lambda: None)
    with TestClient(create_app(idle, ServeSettings(**settings))) as client:
        yield client


def test_each_gesture_posted_is_kept_and_listed_behind_the_key(chatml_tokenizer, tmp_path):
    with app_client(chatml_tokenizer, feedback=str(tmp_path), api_key=KEY) as c:
        for method, path in (("POST", "/v1/feedback"), ("GET", "/v1/feedback")):
            assert assert_envelope(c.request(method, path, json={}), 401)["code"] == "invalid_api_key"
        assert not any(tmp_path.iterdir())
        posted = [{"gesture": "thumbs", "prompt": PROMPT, "reply": GOOD, "label": True},
                  {"gesture": "edit", "prompt": PROMPT, "reply": BAD, "corrected": GOOD},
                  {"gesture": "choice", "prompt": PROMPT, "chosen": GOOD, "rejected": BAD}]
        answers = [c.post("/v1/feedback", json=body, headers=AUTH) for body in posted]
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert answers[1].json() == {"object": "list", "gesture": "edit", "data": [
            {"kind": "sft", "file": "sft.jsonl", "record": {"messages": PROMPT + _reply(GOOD)}},
            {"kind": "preference", "file": "preference.jsonl",
             "record": {"prompt": PROMPT, "chosen": _reply(GOOD), "rejected": _reply(BAD)}}]}
        pair = {"prompt": PROMPT, "chosen": _reply(GOOD), "rejected": _reply(BAD)}
        assert _lines(tmp_path / "preference.jsonl") == [pair, pair]
        assert _lines(tmp_path / "kto.jsonl") == [{"prompt": PROMPT, "completion": _reply(GOOD), "label": True}]
        listed = c.get("/v1/feedback", headers=AUTH).json()
        assert listed["object"] == "list" and listed["directory"] == str(tmp_path)
        assert [(e["kind"], e["line"]) for e in listed["data"]] == [("sft", 1), ("preference", 1),
                                                                    ("preference", 2), ("kto", 1)]
        only = c.get("/v1/feedback?kind=preference&limit=1", headers=AUTH).json()["data"]
        assert only == [{"kind": "preference", "line": 2, "record": pair}]
        for query, param in (("kind=dpo", "kind"), ("limit=0", "limit"), ("limit=x", "limit")):
            assert_envelope(c.get(f"/v1/feedback?{query}", headers=AUTH), 400, param)


@pytest.mark.parametrize("body, param, message", [
    ({"gesture": "thumbs", "prompt": PROMPT, "reply": GOOD}, "label", "A thumbs gesture needs label."),
    ({"gesture": "choice", "prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "label": True}, "label",
     "label is not part of a choice gesture (it takes prompt, chosen and rejected)."),
    ({"gesture": "like", "prompt": PROMPT}, "gesture", "gesture: Input should be 'thumbs', 'edit' or 'choice'"),
    ({"gesture": "thumbs", "prompt": PROMPT, "reply": GOOD, "label": "yes"}, "label",
     "label: Input should be a valid boolean"),
    ({"gesture": "thumbs", "prompt": [], "reply": GOOD, "label": True}, "prompt", None),
    ({"gesture": "thumbs", "prompt": [{"role": "tool", "content": "x"}], "reply": GOOD, "label": True},
     "prompt.0.role", None),
    ({"gesture": "thumbs", "prompt": PROMPT[:1], "reply": GOOD, "label": True}, "prompt.0.role",
     "the prompt must end with the user's turn that the reply answers (it ends with system)"),
    ({"gesture": "choice", "prompt": PROMPT, "chosen": GOOD, "rejected": GOOD}, "rejected",
     "chosen and rejected are the same reply: a pair teaches nothing"),
    ({"gesture": "edit", "prompt": PROMPT, "reply": BAD, "corrected": " "}, "corrected",
     "corrected is empty: an empty reply cannot be learned from"),
    ({"gesture": "thumbs", "prompt": PROMPT, "reply": GOOD, "label": True, "model": "x"}, "model", None),
])
def test_a_gesture_that_would_not_train_is_a_400_naming_the_field(chatml_tokenizer, tmp_path, body, param, message):
    with app_client(chatml_tokenizer, feedback=str(tmp_path)) as c:
        error = assert_envelope(c.post("/v1/feedback", json=body), 400, param)
    if message is not None:
        assert error["message"] == message
    assert not any(tmp_path.iterdir())  # nothing written


def test_without_feedback_the_routes_say_how_to_turn_it_on(chatml_tokenizer, tmp_path):
    from tunesmith.cli import main
    from tunesmith.serve import ServeConfig, ServeError, ServeSettings, create_app

    with app_client(chatml_tokenizer) as c:
        for method in ("GET", "POST"):
            error = assert_envelope(c.request(method, "/v1/feedback", json={"gesture": "thumbs"}), 404)
            assert error["code"] == "feedback_not_configured" and "start it with --feedback DIR" in error["message"]
    (tmp_path / "file").write_text("x")
    assert main(["serve", "--feedback", str(tmp_path / "file")]) == 2  # refused before any model loads
    with pytest.raises(ServeError, match="is a file; give a directory"):
        create_app(SimpleNamespace(tokenizer=chatml_tokenizer, chat_template=None, context_window=256),
                   ServeSettings(feedback=str(tmp_path / "file")))
    assert ServeConfig(feedback=str(tmp_path / "fb")).settings(env={}).feedback == str(tmp_path / "fb")


def test_concurrent_posts_each_append_one_whole_line(chatml_tokenizer, tmp_path):
    from tunesmith.serve import ServeSettings, create_app

    idle = SimpleNamespace(tokenizer=chatml_tokenizer, chat_template=None, context_window=256, models={},
                           start=lambda: None, stop=lambda: None)
    app = create_app(idle, ServeSettings(feedback=str(tmp_path)))

    def post(i):
        with httpx.Client(base_url=url, timeout=30) as http:
            body = {"gesture": "choice", "prompt": PROMPT, "chosen": f"good {i} " + "y" * 3000, "rejected": f"bad {i}"}
            return http.post("/v1/feedback", json=body).status_code

    with uvicorn_on_loopback(app) as url, ThreadPoolExecutor(8) as pool:
        assert list(pool.map(post, range(40))) == [200] * 40
    records = _lines(tmp_path / "preference.jsonl")
    assert sorted(int(r["rejected"][0]["content"].split()[1]) for r in records) == list(range(40))
    assert all(r["chosen"][0]["content"].split()[1] == r["rejected"][0]["content"].split()[1] for r in records)


# -- the files train as they are ---------------------------------------------------------------------------------

def _feedback_files(directory):
    """Six conversations, each judged with all three gestures."""
    log = FeedbackLog(directory)
    for i in range(6):
        prompt = [{"role": "user", "content": f"What is {i}+{i}?"}]
        log.write(thumbs(prompt, f"It is {2 * i}.", True) + thumbs(prompt, "Paris.", False))
        log.write(edit(prompt, f"{2 * i + 1}", f"{2 * i}") + choice(prompt, f"{2 * i}", "I do not know."))
    return {kind: directory / name for kind, name in FILES.items()}


def train_on(tmp_path, model_dir, data, **settings) -> int:
    """`tunesmith train` on `data` with the tiny model for two steps; its exit code."""
    import yaml

    from tunesmith.cli import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model_dir), "data": {"train": str(data), "eval_fraction": 0.25},
        "output_dir": str(tmp_path / f"run-{data.stem}"), "max_steps": 2, "batch_size": 2, "save_steps": 100,
        "eval_max_new_tokens": 2, **settings}))
    return main(["train", str(config)])


def test_the_corrections_validate_and_train_as_chat_data(tmp_path, model_dir):
    from tunesmith.data.formats import validate

    files = _feedback_files(tmp_path / "feedback")
    report = validate(str(files["sft"]))
    assert not report.problems and report.kind == "chat" and report.count == 6
    assert train_on(tmp_path, model_dir, files["sft"]) == 0


def test_the_pairs_train_with_dpo_as_they_are(tmp_path, model_dir):
    files = _feedback_files(tmp_path / "feedback")
    assert train_on(tmp_path, model_dir, files["preference"], task="preference", preference={"objective": "dpo"}) == 0


def test_the_thumbs_train_with_kto_as_they_are(tmp_path, model_dir):
    files = _feedback_files(tmp_path / "feedback")
    assert train_on(tmp_path, model_dir, files["kto"], task="preference", preference={"objective": "kto"}) == 0

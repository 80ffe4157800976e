"""Server-side conversations: the SQLite store (durable, atomic turns, idempotency keys), the history
policy at its boundary, and chat completions that name a conversation."""

from __future__ import annotations

import pytest
from serve_assets import CONTEXT, write_base

from tunesmith.serve.conversations import ConversationStore, fit_history


@pytest.fixture(scope="module")
def client(bpe, tmp_path_factory):
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app, load_engine

    root = tmp_path_factory.mktemp("conv")
    engine = load_engine(str(write_base(bpe, root / "base")))
    engine.models = {"base": next(iter(engine.models.values()))}
    with TestClient(create_app(engine, ServeSettings(conversations=str(root / "c.sqlite")))) as c:
        yield c
    engine.stop()


def say(client, cid, content, **extra):
    body = {"model": "base", "conversation": cid, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": content}], **extra.pop("body", {})}
    return client.post("/v1/chat/completions", json=body, **extra)


def test_store_is_durable_and_turns_are_atomic_and_idempotent(tmp_path):
    path = tmp_path / "c.sqlite"
    store = ConversationStore(path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conv = store.create(system="Be brief.", model="m", metadata={"user": "ann"})
    assert store.add_turn(conv["id"], [{"role": "user", "content": "hi"}], "hello", key="k1")
    assert not store.add_turn(conv["id"], [{"role": "user", "content": "hi"}], "hello again", key="k1")
    store.close()
    again = ConversationStore(path)  # a restart
    assert again.get(conv["id"]) == conv
    assert [(m["role"], m["content"]) for m in again.messages(conv["id"])] == [("user", "hi"), ("assistant", "hello")]
    assert again.reply_for(conv["id"], "k1") == {"role": "assistant", "content": "hello"}
    assert again.delete(conv["id"]) and again.get(conv["id"]) is None and again.messages(conv["id"]) == []


def test_history_policy_keeps_the_system_prompt_and_drops_whole_oldest_turns():
    system = [{"role": "system", "content": "S"}]
    history = [{"role": r, "content": f"{r}{i}"} for i in range(3) for r in ("user", "assistant")]
    new = [{"role": "user", "content": "now"}]
    count = len  # one "token" per message makes the boundary exact
    assert fit_history(system, history, new, count, 8) == system + history + new  # exactly fits
    assert fit_history(system, history, new, count, 7) == system + history[2:] + new  # one turn (2 msgs) dropped
    assert fit_history(system, history, new, count, 4) == system + history[4:] + new
    assert fit_history(system, history, new, count, 3) == system + new
    assert fit_history(system, history, new, count, 2) == system + new
    assert fit_history(system, history, new, count, 1) is None


def test_tool_turns_are_stored_and_come_back_in_the_record_shape(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite")
    cid = store.create()["id"]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert store.add_turn(cid, [{"role": "user", "content": "hi"}], {"role": "assistant", "content": None,
                                                                      "tool_calls": [call]}, key="k")
    assert store.add_turn(cid, [{"role": "tool", "tool_call_id": "call_1", "content": "2"}], "It is 2.")
    stored = [{k: v for k, v in m.items() if k != "created_at"} for m in store.messages(cid)]
    assert stored == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "content": "2", "tool_call_id": "call_1"},
                      {"role": "assistant", "content": "It is 2."}]
    assert store.reply_for(cid, "k") == {"role": "assistant", "content": None, "tool_calls": [call]}


def test_a_reply_keeps_its_reasoning_and_a_store_from_before_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)  # the schema before reasoning was stored, with one turn in it
    old.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, model TEXT, system TEXT,
                                    metadata TEXT NOT NULL);
        CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,
                               role TEXT NOT NULL, content TEXT NOT NULL, created_at INTEGER NOT NULL,
                               idempotency_key TEXT, request_hash TEXT, tool_calls TEXT, tool_call_id TEXT);
        INSERT INTO conversations VALUES ('conv_old', 0, NULL, NULL, '{}');
        INSERT INTO messages (conversation_id, role, content, created_at) VALUES ('conv_old', 'user', 'hi', 0);
        INSERT INTO messages (conversation_id, role, content, created_at) VALUES ('conv_old', 'assistant', 'yo', 0);
    """)
    old.close()
    store = ConversationStore(path)
    thought = {"role": "assistant", "content": "It is 4.", "reasoning_content": "2 and 2 make 4."}
    assert store.add_turn("conv_old", [{"role": "user", "content": "2+2?"}], thought, key="k")
    assert [{k: v for k, v in m.items() if k != "created_at"} for m in store.messages("conv_old")] == \
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
         {"role": "user", "content": "2+2?"}, thought]
    assert store.reply_for("conv_old", "k") == thought


def test_history_policy_keeps_a_call_with_its_results():
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}
    history = [{"role": "user", "content": "u0"}, call, {"role": "tool", "tool_call_id": "c", "content": "r"},
               {"role": "assistant", "content": "a0"}, {"role": "user", "content": "u1"},
               {"role": "assistant", "content": "a1"}]
    new = [{"role": "user", "content": "now"}]
    assert fit_history([], history, new, len, 7) == history + new
    assert fit_history([], history, new, len, 6) == history[4:] + new  # the whole tool turn goes, never half


def test_conversation_endpoints_and_three_turns(client):
    conv = client.post("/v1/conversations", json={"system": "Be brief.", "model": "base",
                                                  "metadata": {"topic": "geo"}}).json()
    assert conv["object"] == "conversation" and conv["system"] == "Be brief."
    assert client.get(f"/v1/conversations/{conv['id']}").json() == conv
    replies = []
    for question in ["What is the capital of France?", "And 2+2?", "Thanks"]:
        r = say(client, conv["id"], question)
        assert r.status_code == 200, r.text
        replies.append(r.json()["choices"][0]["message"]["content"])
    messages = client.get(f"/v1/conversations/{conv['id']}/messages").json()["data"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert [m["content"] for m in messages[1::2]] == replies
    assert client.delete(f"/v1/conversations/{conv['id']}").json()["deleted"] is True
    r = client.get(f"/v1/conversations/{conv['id']}")
    assert r.status_code == 404 and r.json()["error"]["param"] == "conversation_id"
    assert say(client, conv["id"], "hi").status_code == 404


def test_streamed_turn_is_stored_and_a_retry_does_not_duplicate(client):
    cid = client.post("/v1/conversations", json={}).json()["id"]
    first = say(client, cid, "Hello", body={"stream": True}, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 200 and first.text.endswith("data: [DONE]\n\n")
    again = say(client, cid, "Hello", headers={"Idempotency-Key": "abc"}).json()
    stored = client.get(f"/v1/conversations/{cid}/messages").json()["data"]
    assert len(stored) == 2 and again["choices"][0]["message"]["content"] == stored[1]["content"]


def test_long_history_is_trimmed_to_the_window_keeping_the_system_prompt(client, monkeypatch):
    cid = client.post("/v1/conversations", json={"system": "Be brief."}).json()["id"]
    engine = client.app.state.engine
    seen = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda requests: (seen.extend(requests), submit(requests)))
    for i in range(12):  # ~15 tokens a turn: well past the 128-token window
        assert say(client, cid, f"Review: great movie number {i}").status_code == 200
    assert len(seen[-1].ids) + 6 <= CONTEXT
    text = engine.tokenizer.decode(seen[-1].ids)
    assert "Be brief." in text and "number 11" in text and "number 0" not in text


def test_conversation_errors(client):
    assert client.post("/v1/conversations", json={"model": "nope"}).status_code == 404
    assert client.post("/v1/conversations", json={"metadata": "x"}).status_code == 400
    cid = client.post("/v1/conversations", json={}).json()["id"]
    assert say(client, cid, "hi", body={"n": 2}).json()["error"]["param"] == "n"
    assert say(client, "conv_missing", "hi").json()["error"]["param"] == "conversation"

"""Server-side conversations in SQLite (WAL journal, so readers never wait for the writer).

A turn (the new user messages and the reply) is written in one transaction, only once the reply is
complete, so an aborted stream leaves nothing behind. A turn may carry the client's idempotency key and a
fingerprint of its request: a retry with the same key and body finds the stored reply instead of adding a
second turn; the same key with another body is a client error (`KeyReused`), as in payment APIs. While a
keyed turn is being generated, `TurnGate` makes a concurrent retry wait for it.

Tool turns are stored as they came: an assistant message's calls (`tool_calls`, JSON) and each `tool` result
with the `tool_call_id` it answers, and they come back in the same shape (data/tools.py's record), so a replayed
conversation renders as the client's own history would. So is a thinking model's reasoning (`reasoning_content`,
beside the answer): it is returned with the conversation's messages and passed back on its message in the next
turn's prompt, where the chat template decides whether it shows (Qwen3's prints it only for the turns after the
last user message, as in a tool loop, and drops older reasoning itself).

History policy when it outgrows the context window (`fit_history`): the system prompt (the conversation's,
and system messages sent before the first user message) is always kept and the oldest turns are dropped,
whole (a call is never kept without its results, nor a result without its call), until the prompt plus the
reply budget fits."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, model TEXT, system TEXT, metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, created_at INTEGER NOT NULL, idempotency_key TEXT,
    request_hash TEXT, tool_calls TEXT, tool_call_id TEXT, reasoning_content TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS messages_key ON messages(conversation_id, idempotency_key);
"""


_FIELDS = "role, content, created_at, tool_calls, tool_call_id, reasoning_content"  # a message as _message reads it


class KeyReused(Exception):
    """An idempotency key already used in this conversation for a request with another body."""


class ConversationStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(messages)")}
            for column in ("request_hash", "tool_calls", "tool_call_id", "reasoning_content"):  # a store from before
                if column not in columns:
                    self._db.execute(f"ALTER TABLE messages ADD COLUMN {column} TEXT")

    def close(self) -> None:
        self._db.close()

    @staticmethod
    def _conversation(row) -> dict:
        return {"id": row["id"], "object": "conversation", "created_at": row["created_at"], "model": row["model"],
                "system": row["system"], "metadata": json.loads(row["metadata"])}

    def create(self, *, model: str | None = None, system: str | None = None, metadata: dict | None = None) -> dict:
        cid = f"conv_{uuid.uuid4().hex}"
        with self._lock:
            self._db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                             (cid, int(time.time()), model, system, json.dumps(metadata or {})))
        return self.get(cid)

    def get(self, cid: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM conversations WHERE id = ?", (cid,)).fetchone()
        return self._conversation(row) if row else None

    def recent(self, limit: int = 100) -> list[dict]:
        """The newest `limit` conversations, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM conversations ORDER BY created_at DESC, rowid DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [self._conversation(row) for row in rows]

    def delete(self, cid: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount > 0

    @staticmethod
    def _message(row) -> dict:
        """A stored message in the chat record's shape: content None on a reply that is only calls."""
        message = {"role": row["role"], "content": row["content"], "created_at": row["created_at"]}
        if row["tool_calls"]:
            message["tool_calls"] = json.loads(row["tool_calls"])
            message["content"] = row["content"] or None
        if row["tool_call_id"] is not None:
            message["tool_call_id"] = row["tool_call_id"]
        if row["reasoning_content"] is not None:
            message["reasoning_content"] = row["reasoning_content"]
        return message

    def messages(self, cid: str) -> list[dict]:
        """The stored turns, oldest first (the system prompt is on the conversation, not here)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_FIELDS} FROM messages WHERE conversation_id = ? ORDER BY seq",
                                    (cid,)).fetchall()
        return [self._message(row) for row in rows]

    def reply_for(self, cid: str, key: str, request_hash: str | None = None) -> dict | None:
        """The reply message ({"role", "content", "tool_calls"?, "reasoning_content"?}) already stored for an
        idempotency key, if this turn was written before. KeyReused if that turn's request had another fingerprint
        than `request_hash`."""
        with self._lock:
            row = self._db.execute(f"SELECT {_FIELDS}, request_hash FROM messages WHERE conversation_id = ? AND "
                                   "idempotency_key = ?", (cid, key)).fetchone()
        if row is None:
            return None
        if request_hash and row["request_hash"] and row["request_hash"] != request_hash:
            raise KeyReused(key)
        message = self._message(row)
        message.pop("created_at")
        return message

    def add_turn(self, cid: str, user: list[dict], reply: str | dict, key: str | None = None,
                 request_hash: str | None = None) -> bool:
        """Append the new messages (user turns, tool results) and the reply (its text, or the record of a reply
        with calls or reasoning) atomically. False if the key was already used (a retry)."""
        reply = {"role": "assistant", "content": reply} if isinstance(reply, str) else reply
        now = int(time.time())
        insert = ("INSERT INTO messages (conversation_id, role, content, created_at, tool_calls, tool_call_id, "
                  "reasoning_content, idempotency_key, request_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")

        def row(message: dict, key: str | None = None, request_hash: str | None = None) -> tuple:
            calls = message.get("tool_calls")
            return (cid, message["role"], message.get("content") or "", now, json.dumps(calls) if calls else None,
                    message.get("tool_call_id"), message.get("reasoning_content"), key, request_hash)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for message in user:
                    self._db.execute(insert, row(message))
                self._db.execute(insert, row(reply, key, request_hash))
                self._db.execute("COMMIT")
                return True
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                return False


class TurnGate:
    """One keyed turn at a time: a request whose (conversation, idempotency key) is being generated waits
    until that generation ends, then finds its stored reply (or, if it failed, generates itself).
    Used on the event loop only, so checking and taking a key need no lock."""

    def __init__(self):
        self._busy: dict[tuple[str, str], asyncio.Event] = {}

    async def acquire(self, cid: str, key: str) -> None:
        while (busy := self._busy.get((cid, key))) is not None:
            await busy.wait()
        self._busy[(cid, key)] = asyncio.Event()

    def release(self, cid: str, key: str) -> None:
        busy = self._busy.pop((cid, key), None)
        if busy is not None:
            busy.set()


def pinned(system: str | None, stored: list[dict]) -> tuple[list[dict], list[dict]]:
    """(system messages, turns) of a conversation: its own system prompt plus the system messages sent
    before the first user message are kept in every prompt; what follows is history that may be trimmed."""
    lead = next((i for i, m in enumerate(stored) if m["role"] != "system"), len(stored))
    own = [{"role": "system", "content": system}] if system else []
    return own + stored[:lead], stored[lead:]


def fit_history(system: list[dict], history: list[dict], new: list[dict], count, budget: int) -> list[dict] | None:
    """system + the newest part of history + new, dropping the oldest turns until `count(messages)` (prompt
    tokens) is at most `budget`. A turn starts with the first message sent after a reply (a user message, or a
    system message sent with it), so a reply never loses its question; tool results are not a new turn, so a
    call keeps its results and they their call. None if even system + new does not fit."""
    replies = ("assistant", "tool")
    starts = [i for i, m in enumerate(history)
              if m["role"] not in replies and (i == 0 or history[i - 1]["role"] in replies)] + [len(history)]
    lo, hi = 0, len(starts) - 1  # binary search the first kept turn: fewer turns, fewer tokens
    if count(system + history[starts[0]:] + new) <= budget:
        return system + history[starts[0]:] + new
    if count(system + new) > budget:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(system + history[starts[mid]:] + new) <= budget:
            hi = mid
        else:
            lo = mid
    return system + history[starts[hi]:] + new

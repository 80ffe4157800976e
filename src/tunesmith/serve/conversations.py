"""Server-side conversations in SQLite (WAL journal, so readers never wait for the writer).

A turn (the new user messages and the reply) is written in one transaction, only once the reply is
complete, so an aborted stream leaves nothing behind. A turn may carry the client's idempotency key: a
retry with the same key finds the stored reply instead of adding a second turn.

History policy when it outgrows the context window (`fit_history`): the system prompt is always kept and
the oldest turns are dropped, whole, until the prompt plus the reply budget fits."""

from __future__ import annotations

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
    role TEXT NOT NULL, content TEXT NOT NULL, created_at INTEGER NOT NULL, idempotency_key TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS messages_key ON messages(conversation_id, idempotency_key);
"""


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

    def delete(self, cid: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount > 0

    def messages(self, cid: str) -> list[dict]:
        """The stored turns, oldest first (the system prompt is on the conversation, not here)."""
        with self._lock:
            rows = self._db.execute("SELECT role, content, created_at FROM messages WHERE conversation_id = ? "
                                    "ORDER BY seq", (cid,)).fetchall()
        return [dict(row) for row in rows]

    def reply_for(self, cid: str, key: str) -> str | None:
        """The reply already stored for an idempotency key, if this turn was written before."""
        with self._lock:
            row = self._db.execute("SELECT content FROM messages WHERE conversation_id = ? AND idempotency_key = ?",
                                   (cid, key)).fetchone()
        return row["content"] if row else None

    def add_turn(self, cid: str, user: list[dict], reply: str, key: str | None = None) -> bool:
        """Append the user messages and the reply atomically. False if the key was already used (a retry)."""
        now = int(time.time())
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for message in user:
                    self._db.execute("INSERT INTO messages (conversation_id, role, content, created_at) "
                                     "VALUES (?, ?, ?, ?)", (cid, message["role"], message["content"], now))
                self._db.execute("INSERT INTO messages (conversation_id, role, content, created_at, idempotency_key) "
                                 "VALUES (?, 'assistant', ?, ?, ?)", (cid, reply, now, key))
                self._db.execute("COMMIT")
                return True
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                return False


def fit_history(system: list[dict], history: list[dict], new: list[dict], count, budget: int) -> list[dict] | None:
    """system + the newest part of history + new, dropping the oldest turns until `count(messages)` (prompt
    tokens) is at most `budget`. A turn starts at a user message, so a reply never loses its question.
    None if even system + new does not fit."""
    starts = [i for i, m in enumerate(history) if m["role"] == "user"] + [len(history)]
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

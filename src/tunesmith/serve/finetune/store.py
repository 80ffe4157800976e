"""Fine-tuning jobs and their events in SQLite, under the server's state directory, so that they survive a
restart: each job is OpenAI's `fine_tuning.job` object plus the runner's own notes on it (its process, how far
its log has been read), each event OpenAI's `fine_tuning.job.event`. Written by the runner on the event loop
only; the lock makes reads from worker threads safe too."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, record TEXT NOT NULL, notes TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL REFERENCES jobs(id), event TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""
DONE = ("succeeded", "failed", "cancelled")  # a job in one of these never changes again


@dataclass
class Job:
    """One job: `record` is what clients see (OpenAI's object), `notes` what only the runner reads."""

    record: dict
    notes: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def status(self) -> str:
        return self.record["status"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page of `items` (already in the order listed): those after the item whose id is `after`,
    at most `limit` of them."""
    start = next((i + 1 for i, item in enumerate(items) if item["id"] == after), 0) if after else 0
    data = items[start:start + limit]
    return {"object": "list", "data": data, "has_more": start + limit < len(items),
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


class JobStore:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, job: Job) -> None:
        with self._lock:
            self._db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?)", (job.id, job.record["created_at"],
                                                                     json.dumps(job.record), json.dumps(job.notes)))

    def save(self, job: Job) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET record = ?, notes = ? WHERE id = ?",
                             (json.dumps(job.record), json.dumps(job.notes), job.id))

    def get(self, jid: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT record, notes FROM jobs WHERE id = ?", (jid,)).fetchone()
        return Job(json.loads(row[0]), json.loads(row[1])) if row else None

    def jobs(self, *statuses: str) -> list[Job]:
        """Every job (or those in one of `statuses`), newest first."""
        with self._lock:
            rows = self._db.execute("SELECT record, notes FROM jobs ORDER BY created_at DESC, rowid DESC").fetchall()
        found = [Job(json.loads(record), json.loads(notes)) for record, notes in rows]
        return [job for job in found if not statuses or job.status in statuses]

    def event(self, jid: str, message: str, *, level: str = "info", data: dict | None = None,
              type: str = "message") -> dict:
        """Record one of the job's events (OpenAI's shape: `type` is "message" or "metrics")."""
        event = {"object": "fine_tuning.job.event", "id": new_id("ftevent"), "created_at": int(time.time()),
                 "level": level, "message": message, "data": data or {}, "type": type}
        with self._lock:
            self._db.execute("INSERT INTO events (job_id, event) VALUES (?, ?)", (jid, json.dumps(event)))
        return event

    def events(self, jid: str) -> list[dict]:
        """The job's events, newest first (as OpenAI lists them)."""
        with self._lock:
            rows = self._db.execute("SELECT event FROM events WHERE job_id = ? ORDER BY seq DESC", (jid,)).fetchall()
        return [json.loads(row[0]) for row in rows]

"""Feedback people give on a model's replies, kept as training data in TRL's conversational formats: a thumb up
or down is a KTO record, a choice between two replies a preference pair, and a corrected reply both an SFT
record and a preference pair (the correction over the original). The web page (`tunesmith serve --feedback
DIR`) and `tunesmith chat --feedback DIR` write them through one `FeedbackLog`.

Each kind has its own file under the directory (`FILES`), because a trainer takes one shape per file:
`preference.jsonl` trains with `objective: dpo` (or orpo), `kto.jsonl` with `objective: kto`, `sft.jsonl` with
`task: sft`. The records are exactly TRL's shapes, with nothing added (who judged, when, which model), so every
reader of those formats takes them as they are."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .errors import TunesmithError

try:  # POSIX: a lock that also holds against another process writing the same file (a chat beside a server)
    import fcntl
except ImportError:  # pragma: no cover - Windows: the in-process lock alone
    fcntl = None

FILES = {"sft": "sft.jsonl", "preference": "preference.jsonl", "kto": "kto.jsonl"}  # kind -> file name
ROLES = ("system", "user", "assistant")


class FeedbackError(TunesmithError, ValueError):
    """Feedback that would not make a training record; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _reply(text: str, param: str) -> list[dict]:
    if not isinstance(text, str) or not text.strip():
        raise FeedbackError(f"{param} is empty: an empty reply cannot be learned from", param)
    return [{"role": "assistant", "content": text}]


def prompt_of(messages: list[dict]) -> list[dict]:
    """The conversation a reply answered, as {"role", "content"} messages (anything else a message carries, such
    as a thinking model's reasoning, is left out); it must end with the user's turn."""
    if not messages:
        raise FeedbackError("prompt is empty: give the conversation up to the user's turn", "prompt")
    prompt = []
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise FeedbackError(f"prompt message {i} must be a {', '.join(ROLES)} message with text content",
                                f"prompt.{i}")
        prompt.append({"role": m["role"], "content": m["content"]})
    if prompt[-1]["role"] != "user":
        raise FeedbackError(f"the prompt must end with the user's turn that the reply answers (it ends with "
                            f"{prompt[-1]['role']})", f"prompt.{len(prompt) - 1}.role")
    return prompt


def thumbs(messages: list[dict], reply: str, label: bool) -> list[tuple[str, dict]]:
    """👍/👎 on `reply` to `messages`: one KTO record, `label` true for a good reply."""
    return [("kto", {"prompt": prompt_of(messages), "completion": _reply(reply, "reply"), "label": bool(label)})]


def choice(messages: list[dict], chosen: str, rejected: str) -> list[tuple[str, dict]]:
    """One reply preferred over another to the same `messages`: one preference pair."""
    record = {"prompt": prompt_of(messages), "chosen": _reply(chosen, "chosen"),
              "rejected": _reply(rejected, "rejected")}
    if chosen == rejected:
        raise FeedbackError("chosen and rejected are the same reply: a pair teaches nothing", "rejected")
    return [("preference", record)]


def edit(messages: list[dict], reply: str, corrected: str) -> list[tuple[str, dict]]:
    """`reply` corrected to `corrected`: an SFT record of the conversation with the correction, and a pair that
    prefers the correction to the original (none when the original is empty: a pair needs two replies)."""
    if corrected == reply:
        raise FeedbackError("the corrected reply is the same as the original: nothing to learn", "corrected")
    prompt = prompt_of(messages)
    sft = ("sft", {"messages": [*prompt, *_reply(corrected, "corrected")]})
    return [sft, *(choice(prompt, corrected, reply) if reply.strip() else [])]


# gesture -> (what makes its records, the fields it takes beside the conversation)
GESTURES = {"thumbs": (thumbs, ("reply", "label")), "edit": (edit, ("reply", "corrected")),
            "choice": (choice, ("chosen", "rejected"))}


class FeedbackLog:
    """The feedback directory: `write` appends records, `read` lists them. A file is only ever appended to, one
    whole JSON line per write, so nothing already kept can be lost or interleaved with another writer's line."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise FeedbackError(f"--feedback {directory}: is a file; give a directory (feedback is kept there as "
                                f"{', '.join(FILES.values())})")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, kind: str) -> Path:
        return self.directory / FILES[kind]

    def write(self, records: list[tuple[str, dict]]) -> list[dict]:
        """Append each (kind, record) to its file; [{"kind", "file", "record"}] as written."""
        for kind, record in records:
            self._append(self.path(kind), (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        return [{"kind": kind, "file": FILES[kind], "record": record} for kind, record in records]

    def _append(self, path: Path, line: bytes) -> None:
        # One os.write of the whole line on an O_APPEND descriptor: the kernel puts it at the end in one piece,
        # whoever else appends. A short write (a full disk) is cut off again, so the next line starts clean.
        with self._lock:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a line left unfinished by someone's crash
                    line = b"\n" + line
                written = os.write(fd, line)
                if written != len(line):
                    os.ftruncate(fd, size)
                    raise OSError(f"{path}: only {written} of {len(line)} bytes could be written (is the disk full?)")
                os.fsync(fd)
            finally:
                os.close(fd)  # closing releases the flock

    def read(self, kind: str | None = None, limit: int | None = None) -> list[dict]:
        """[{"kind", "line", "record"}] of each file (or `kind`'s) in order, the last `limit` records of each;
        blank lines and lines that are not a JSON object (a half-written one) are skipped."""
        found = []
        for name in ([kind] if kind else FILES):
            try:
                text = self.path(name).read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue
            entries = []
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:
                    continue
                if isinstance(record, dict):
                    entries.append({"kind": name, "line": number, "record": record})
            found += entries[-limit:] if limit else entries
        return found

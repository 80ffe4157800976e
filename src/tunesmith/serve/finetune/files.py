"""Uploaded training files as OpenAI's `file` objects, kept under the server's state directory.

An upload is checked with the readers of `tunesmith data validate` before it is kept, so a bad file is refused
at once with its `file:line` problems rather than failing a job later. A kept file appears whole or not at all:
its bytes and its record (file.json) are written into a hidden directory and flushed to disk, and the directory
is then renamed into place (a rename is atomic), so a kill leaves either no file or a complete one."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from ..adapters import ServeError

PURPOSE = "fine-tune"  # the one purpose this server keeps files for
RECORD = "file.json"  # {"object": OpenAI's file object, "data": {"format", "kind", "records"}}
SHOWN_PROBLEMS = 10  # problems quoted in a refusal; the rest are counted


class FileRefused(ServeError):
    """An upload that is not kept: `param` names the form field to fix (the server's 400)."""

    def __init__(self, message: str, param: str = "file"):
        super().__init__(message)
        self.message, self.param = message, param


def _sync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def safe_filename(name: str | None) -> str:
    """The client's file name without its directories, and with only characters safe in a path kept."""
    base = re.sub(r"[^A-Za-z0-9._ -]", "_", Path((name or "").replace("\\", "/")).name).strip(" .")
    return base[:128] or "upload.jsonl"


def parse_form(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (file name or None, content)} of a multipart/form-data body, parsed by python-multipart (the
    parser Starlette's own form handling uses); the body is already in memory, bounded by the upload limit."""
    import python_multipart
    from python_multipart.exceptions import FormParserError

    ctype, options = python_multipart.multipart.parse_options_header(content_type)
    if ctype != b"multipart/form-data" or not options.get(b"boundary"):
        raise FileRefused("Upload the file as multipart/form-data (a `file` field and a `purpose` field).", None)
    fields: dict[str, tuple[str | None, bytes]] = {}

    def on_field(field) -> None:
        fields[field.field_name.decode("utf-8", "replace")] = (None, field.value or b"")

    def on_file(file) -> None:
        file.file_object.seek(0)
        name = file.file_name.decode("utf-8", "replace") if file.file_name else None
        fields[file.field_name.decode("utf-8", "replace")] = (name, file.file_object.read())
        file.close()

    headers = {"Content-Type": content_type.encode("latin-1"), "Content-Length": str(len(body)).encode()}
    try:
        python_multipart.parse_form(headers, io.BytesIO(body), on_field, on_file)
    except (FormParserError, ValueError) as err:
        raise FileRefused(f"The multipart body is malformed: {err}.", None) from None
    return fields


class FileStore:
    """The uploaded files in `root`: one directory per file, named by its id, holding the file and RECORD."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".*-file-*"):  # an upload or a deletion a kill interrupted
            shutil.rmtree(stale, ignore_errors=True)

    def _record(self, fid: str) -> dict | None:
        if not re.fullmatch(r"file-[0-9a-f]+", fid):
            return None
        try:
            return json.loads((self.root / fid / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def get(self, fid: str) -> dict | None:
        """OpenAI's file object, or None when no such file is kept."""
        record = self._record(fid)
        return record["object"] if record else None

    def data(self, fid: str) -> dict | None:
        """What validation found in the file: {"format", "kind", "records"}."""
        record = self._record(fid)
        return record["data"] if record else None

    def path(self, fid: str) -> Path | None:
        """Where the file's content is, or None when no such file is kept."""
        record = self._record(fid)
        return self.root / fid / record["object"]["filename"] if record else None

    def list(self, purpose: str | None = None) -> list[dict]:
        """Every file object, newest first."""
        found = [self.get(p.name) for p in self.root.iterdir() if not p.name.startswith(".")]
        found = [f for f in found if f is not None and purpose in (None, f["purpose"])]
        return sorted(found, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def delete(self, fid: str) -> bool:
        if self._record(fid) is None:
            return False
        trash = self.root / f".deleting-{fid}"
        os.replace(self.root / fid, trash)  # gone from listings at once, even if the removal is interrupted
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def add(self, filename: str | None, content: bytes, purpose: str) -> dict:
        """Keep `content` as a new file once it validates; FileRefused with the problems when it does not.
        Reads the whole file: call it off the event loop."""
        if purpose != PURPOSE:
            raise FileRefused(f"This server keeps files for fine-tuning only: purpose must be {PURPOSE!r}, not "
                              f"{purpose!r}.", "purpose")
        fid, name = f"file-{uuid.uuid4().hex[:24]}", safe_filename(filename)
        staging = self.root / f".upload-{fid}"
        staging.mkdir()
        try:
            write_durably(staging / name, content)
            data = _validated(staging / name, name)
            obj = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                   "filename": name, "purpose": purpose, "status": "processed", "status_details": None,
                   "expires_at": None}
            write_durably(staging / RECORD, json.dumps({"object": obj, "data": data}).encode())
            _sync_dir(staging)
            os.replace(staging, self.root / fid)
            _sync_dir(self.root)
            return obj
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _validated(path: Path, name: str) -> dict:
    """{"format", "kind", "records"} of a file `data validate` accepts; FileRefused naming each problem at
    `name:line` (the client's name for the file, not where the server keeps it)."""
    from ...data.formats import validate

    report = validate(path)
    if report.problems:
        shown = [str(dataclasses.replace(p, file=name)) for p in report.problems[:SHOWN_PROBLEMS]]
        more = len(report.problems) - len(shown)
        raise FileRefused(f"{name} is not valid training data ({len(report.problems)} problem"
                          f"{'s' * (len(report.problems) > 1)}; `tunesmith data validate` shows the same): "
                          + "; ".join(shown) + (f"; and {more} more" if more else ""))
    return {"format": report.format, "kind": report.kind, "records": report.count}

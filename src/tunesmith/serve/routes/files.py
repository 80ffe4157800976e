"""/v1/files: upload, list, read, read the content of and delete the files fine-tuning jobs train on.

OpenAI's files API: an upload is multipart with `purpose: fine-tune`, checked with the readers of `tunesmith data
validate` (a bad file is refused with its file:line problems) and kept under --state-dir. Like /v1/fine_tuning,
these routes are on only where fine-tuning is (`fine_tuning_on`).

One route of tunesmith's own, POST /v1/files/import, makes a training file of what the server keeps, for the web
page's Train view: the saved conversations (/v1/conversations) as chat records, or a --feedback file as it is. The
result is an ordinary uploaded file, checked the same way, so the jobs API needs nothing new to train on it."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from ..errors import APIError
from ..finetune import Runner
from ..finetune.files import PURPOSE, FileRefused, parse_form
from ..finetune.store import page
from .common import read, read_body
from .feedback import feedback_log

FORM_BYTES = 64 * 1024  # what a multipart body may carry beyond the file: boundaries, headers, the purpose
MAX_CONVERSATIONS = 100_000  # the newest this many saved conversations are made into one training file
SOURCES = {"conversations": "conversations.jsonl", "feedback/sft": "sft.jsonl",
           "feedback/preference": "preference.jsonl"}  # import source -> the name its file gets


def fine_tuning_on(request: Request) -> Runner:
    """The server's fine-tuning runner; a 403 saying how to turn fine-tuning on where it is off."""
    runner = request.app.state.tuning
    if runner is None:
        raise APIError(403, request.app.state.tuning_off, code="fine_tuning_off")
    return runner


router = APIRouter(dependencies=[Depends(fine_tuning_on)])


def file_or_404(runner: Runner, fid: str) -> dict:
    found = runner.files.get(fid)
    if found is None:
        raise APIError(404, f"No such File object: {fid}", param="id", code="file_not_found")
    return found


def _form_field(fields: dict, name: str, hint: str) -> tuple[str | None, bytes]:
    if name not in fields:
        raise APIError(400, f"The upload has no `{name}` field: {hint}", param=name)
    return fields[name]


@router.post("/v1/files")
async def upload(request: Request):
    runner, limit = fine_tuning_on(request), request.app.state.settings.max_upload_bytes
    too_big = APIError(413, f"The file is larger than this server's upload limit of {limit / 2**20:g} MB "
                            "(tunesmith serve --max-upload-mb).", param="file", code="file_too_large")
    body = await read_body(request, limit + FORM_BYTES, too_big)
    try:
        fields = await run_in_threadpool(parse_form, body, request.headers.get("content-type", ""))
        filename, content = _form_field(fields, "file", "send the data as the multipart field `file`.")
        _, purpose = _form_field(fields, "purpose", "send purpose=fine-tune with the file.")
        if len(content) > limit:
            raise too_big
        return await run_in_threadpool(runner.files.add, filename, content, purpose.decode("utf-8", "replace"))
    except FileRefused as err:
        raise APIError(400, err.message, param=err.param, code="invalid_file") from None


class FileImport(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    source: Literal[tuple(SOURCES)]


def conversation_records(store) -> tuple[list[dict], int]:
    """(one chat record per saved conversation with a reply, oldest first: its system prompt and its turns; how
    many conversations were left out: those with no reply yet, and those with tool calls, since the store keeps no
    definitions of the tools they called and a record of calls without them would not validate)."""
    records, left_out = [], 0
    for conversation in reversed(store.recent(MAX_CONVERSATIONS)):
        stored = store.messages(conversation["id"])
        if not any(m["role"] == "assistant" for m in stored) or any(
                m["role"] not in ("user", "assistant") or "tool_calls" in m for m in stored):
            left_out += 1
            continue
        system = [{"role": "system", "content": conversation["system"]}] if conversation["system"] else []
        records.append({"messages": system + [{"role": m["role"], "content": m["content"]} for m in stored]})
    return records, left_out


def _import_records(request: Request, source: str) -> tuple[list[dict], int]:
    """(records, how many were left out) of an import `source`; APIError 400 when there is nothing to train on."""
    if source == "conversations":
        records, left_out = conversation_records(request.app.state.store)
        empty = ("No saved conversation has a reply to train on yet: chat in the playground (or send `conversation` "
                 "with /v1/chat/completions) first.")
    else:
        log, kind = feedback_log(request), source.split("/")[1]
        records, left_out = [entry["record"] for entry in log.read(kind)], 0
        empty = f"No {kind} feedback is kept yet: {log.path(kind)} holds no records."
    if not records:
        raise APIError(400, empty + (f" ({left_out} left out: tool calls, or no reply yet.)" if left_out else ""),
                       param="source", code="no_training_data")
    return records, left_out


@router.post("/v1/files/import")
async def import_file(request: Request):
    """A training file made of what the server keeps: OpenAI's file object, plus `tunesmith`: {"source",
    "records", "left_out"}. Checked and kept as an upload is; refused (400) with its problems when it does not
    validate (the preference pairs, until tunesmith's readers take them)."""
    runner, body = fine_tuning_on(request), await read(request, FileImport)
    records, left_out = await run_in_threadpool(_import_records, request, body.source)
    content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    limit = request.app.state.settings.max_upload_bytes
    if len(content) > limit:
        raise APIError(413, f"The training file made of the {body.source} would be {len(content) / 2**20:.1f} MB, "
                            f"larger than this server's upload limit of {limit / 2**20:g} MB (tunesmith serve "
                            "--max-upload-mb).",
                       param="source", code="file_too_large")
    try:
        kept = await run_in_threadpool(runner.files.add, SOURCES[body.source], content, PURPOSE)
    except FileRefused as err:
        raise APIError(400, err.message, param="source", code="invalid_file") from None
    return {**kept, "tunesmith": {"source": body.source, "records": len(records), "left_out": left_out}}


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                     limit: int = Query(10000, ge=1, le=10000), order: str = Query("desc", pattern="^(asc|desc)$")):
    found = fine_tuning_on(request).files.list(purpose)
    return page(found if order == "desc" else found[::-1], after, limit)


@router.get("/v1/files/{fid}")
async def get_file(request: Request, fid: str):
    return file_or_404(fine_tuning_on(request), fid)


@router.get("/v1/files/{fid}/content")
async def file_content(request: Request, fid: str):
    runner = fine_tuning_on(request)
    file_or_404(runner, fid)
    return FileResponse(runner.files.path(fid), media_type="application/octet-stream")


@router.delete("/v1/files/{fid}")
async def delete_file(request: Request, fid: str):
    runner = fine_tuning_on(request)
    file_or_404(runner, fid)
    runner.files.delete(fid)
    return {"id": fid, "object": "file", "deleted": True}

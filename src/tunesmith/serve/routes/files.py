"""/v1/files: upload, list, read, read the content of and delete the files fine-tuning jobs train on.

OpenAI's files API: an upload is multipart with `purpose: fine-tune`, checked with the readers of `tunesmith data
validate` (a bad file is refused with its file:line problems) and kept under --state-dir. Like /v1/fine_tuning,
these routes are on only where fine-tuning is (`fine_tuning_on`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ..errors import APIError
from ..finetune import Runner
from ..finetune.files import FileRefused, parse_form
from ..finetune.store import page
from .common import read_body

FORM_BYTES = 64 * 1024  # what a multipart body may carry beyond the file: boundaries, headers, the purpose


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

"""/v1/fine_tuning/jobs: create, list, read and cancel fine-tuning jobs, and list their events and checkpoints.

OpenAI's fine-tuning jobs API over tunesmith's training: a job is validated into a training config, then queued;
its events come newest first (queued, started, step and loss, metrics, succeeded or failed with the reason). The
work is the runner's (`app.state.tuning`, serve/finetune/); a job that succeeds is served as its
`fine_tuned_model` at once."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from ..errors import APIError
from ..finetune import JobError
from ..finetune.request import JobRequest
from ..finetune.store import page
from .common import read
from .files import fine_tuning_on

router = APIRouter(dependencies=[Depends(fine_tuning_on)])
JOBS = "/v1/fine_tuning/jobs"


def _answer(call, *args):
    """`call(*args)`, a JobError answered in OpenAI's envelope."""
    try:
        return call(*args)
    except JobError as err:
        raise APIError(err.status, err.message, param=err.param, code=err.code,
                       type="not_found_error" if err.status == 404 else "invalid_request_error") from None


@router.post(JOBS)
async def create_job(request: Request):
    body = await read(request, JobRequest)
    return _answer(fine_tuning_on(request).create, body)


@router.get(JOBS)
async def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
    return page([job.record for job in fine_tuning_on(request).store.jobs()], after, limit)


@router.get(JOBS + "/{jid}")
async def get_job(request: Request, jid: str):
    return _answer(fine_tuning_on(request).get, jid).record


@router.post(JOBS + "/{jid}/cancel")
async def cancel_job(request: Request, jid: str):
    return _answer(fine_tuning_on(request).cancel, jid)


@router.get(JOBS + "/{jid}/events")
async def job_events(request: Request, jid: str, after: str | None = None, limit: int = Query(20, ge=1, le=100)):
    runner = fine_tuning_on(request)
    _answer(runner.get, jid)
    return page(runner.store.events(jid), after, limit)


@router.get(JOBS + "/{jid}/checkpoints")
async def job_checkpoints(request: Request, jid: str, after: str | None = None,
                          limit: int = Query(10, ge=1, le=100)):
    return page(_answer(fine_tuning_on(request).checkpoints, jid), after, limit)

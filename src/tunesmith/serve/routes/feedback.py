"""POST /v1/feedback (a gesture on a reply: `thumbs`, `edit` or `choice`, kept as training records) and
GET /v1/feedback (the records kept), over the `--feedback DIR` log on `app.state.feedback` (tunesmith/feedback.py
makes and writes the records). Without --feedback both answer 404 with how to turn it on."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ...feedback import FILES, GESTURES, FeedbackError, FeedbackLog
from ..errors import APIError
from .common import read

router = APIRouter()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class FeedbackRequest(_Strict):
    """A gesture on a reply to `prompt` (the conversation up to the user's turn). thumbs: `reply`, `label`
    (true = 👍); edit: `reply` (the original) and `corrected`; choice: `chosen` and `rejected`."""

    gesture: Literal[tuple(GESTURES)]
    prompt: Annotated[list[Message], Field(min_length=1)]
    reply: str | None = None
    label: bool | None = None
    corrected: str | None = None
    chosen: str | None = None
    rejected: str | None = None

    def records(self) -> list[tuple[str, dict]]:
        """The gesture's (kind, record) pairs; APIError 400 naming the field that is missing, stray or wrong."""
        make, needs = GESTURES[self.gesture]
        given = {name for name in self.model_fields_set - {"gesture", "prompt"} if getattr(self, name) is not None}
        for name in needs:
            if name not in given:
                raise APIError(400, f"A {self.gesture} gesture needs {name}.", param=name,
                               code="missing_required_parameter")
        if stray := sorted(given - set(needs)):
            raise APIError(400, f"{stray[0]} is not part of a {self.gesture} gesture (it takes prompt, "
                           f"{' and '.join(needs)}).", param=stray[0])
        try:
            return make([m.model_dump() for m in self.prompt], *(getattr(self, name) for name in needs))
        except FeedbackError as err:
            raise APIError(400, str(err), param=err.param) from None


def feedback_log(request: Request) -> FeedbackLog:
    log = request.app.state.feedback
    if log is None:
        raise APIError(404, "This server keeps no feedback: start it with --feedback DIR to keep thumbs, edits and "
                       "side-by-side choices there as training data.", code="feedback_not_configured",
                       type="not_found_error")
    return log


@router.post("/v1/feedback")
async def give_feedback(request: Request):
    log = feedback_log(request)
    body = await read(request, FeedbackRequest)
    written = await run_in_threadpool(log.write, body.records())
    return {"object": "list", "gesture": body.gesture, "data": written}


@router.get("/v1/feedback")
async def list_feedback(request: Request, kind: Literal[tuple(FILES)] | None = Query(None),
                        limit: int = Query(1000, ge=1, le=100_000)):
    """{"object": "list", "directory", "data": [{"kind", "line", "record"}]}: each file's last `limit` records."""
    log = feedback_log(request)
    data = await run_in_threadpool(log.read, kind, limit)
    return {"object": "list", "directory": str(log.directory), "data": data}

"""What the route families share: reading a size-limited JSON body, the fields every response carries, usage,
and server-sent events (a stream whose end, however it comes, cancels the generation behind it)."""

from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from ..errors import APIError
from ..jobs import Job, grammar_work
from ..schemas import BodyError, parse

MAX_BODY_BYTES = 1_000_000  # the default body limit (ServeSettings.max_body_bytes)


async def read_body(request: Request, limit: int, too_big: APIError) -> bytes:
    """The raw body, refused with `too_big` past `limit` bytes before it is read in full."""
    length = request.headers.get("content-length") or "0"
    if not length.isdigit():
        raise APIError(400, "The Content-Length header must be a number of bytes.")
    if int(length) > limit:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:  # nobody is left to answer; no traceback for a client that hung up
        raise APIError(400, "The client closed the connection before sending the whole body.",
                       code="client_disconnected") from None
    return bytes(body)


async def read_json(request: Request, schema):
    """(validated body, its JSON object): refused (413) past the server's body limit before it is read in full,
    parsed in a worker thread, its JSON schemas checked on the grammar threads, every problem a 400 naming the
    field."""
    settings = getattr(request.app.state, "settings", None)
    limit = settings.max_body_bytes if settings is not None else MAX_BODY_BYTES
    too_big = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    body = await read_body(request, limit, too_big)
    try:
        parsed = await run_in_threadpool(parse, body, schema)
    except BodyError as err:
        raise APIError(400, err.message, param=err.param, code=err.code) from None
    # The schemas in it (response_format, tools' parameters) compile on the grammar threads, cached.
    check = getattr(parsed[0], "grammar_problem", None)
    if check is not None and (problem := await grammar_work(check)) is not None:
        raise APIError(400, problem[1], param=problem[0], code="unsupported_parameter")
    return parsed


async def read(request: Request, schema):
    """The validated body alone (see `read_json`)."""
    body, _ = await read_json(request, schema)
    return body


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # as OpenAI: prompt tokens the prefix cache gave


class Reply:
    """The fields that a response and each of its stream chunks share: one id and creation time per call."""

    def __init__(self, prefix: str, object: str, model: str):
        self.id, self.created, self.object, self.model = f"{prefix}-{uuid.uuid4().hex}", int(time.time()), object, model

    def __call__(self, choices: list[dict], usage: dict | None = None, *, object: str | None = None) -> dict:
        data = {"id": self.id, "object": object or self.object, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return data


async def collect(job: Job, texts: list[str], *logprobs) -> tuple[dict, dict, int]:
    """Run `job` to its end, adding each choice's text to `texts`: (finish reasons, logprobs merged per choice
    from the `logprobs(event)` builders, completion tokens). The job is cancelled however this ends."""
    finish, lps, completion = {}, {}, 0
    try:
        async for ev in job.events():
            texts[ev.index] += ev.text
            completion += ev.completion_tokens
            for build in logprobs:
                if (lp := build(ev)) is not None:
                    merged = lps.setdefault(ev.index, {k: [] for k in lp})
                    for k, v in lp.items():
                        merged[k] += v
            if ev.finish_reason:
                finish[ev.index] = ev.finish_reason
    finally:
        job.cancel()
    return finish, lps, completion


async def chunks_of(job: Job, body, reply: Reply, prompt_tokens: int, choices):
    """Stream chunks: one per choice dict that `choices(event)` yields, then the usage if the body asks for it."""
    completion = 0
    async for ev in job.events():
        completion += ev.completion_tokens
        for choice in choices(ev):
            yield reply([choice])
    if body.stream_options and body.stream_options.include_usage:
        yield reply([], usage(prompt_tokens, completion, job.cached_tokens))


def sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


class Stream(StreamingResponse):
    """Server-sent events; `on_close` callbacks run however the response ends: done, failed or hung up on
    (also when the body never started, where a generator's `finally` would not run)."""

    def __init__(self, chunks, on_close: list):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass  # the client hung up: nobody to tell
        finally:
            for callback in self.on_close:
                callback()


def streaming(job: Job, chunks, on_done=None) -> Stream:
    """`chunks` as events, closed by [DONE] (after `on_done`), or by the error's envelope when generation fails."""
    async def body():
        try:
            async for data in chunks:
                yield sse(data)
            if on_done:
                on_done()
            yield "data: [DONE]\n\n"
        except APIError as err:
            yield sse(json.loads(err.response().body))
    return Stream(body(), on_close=[job.cancel])  # the client went away (or we are done): stop generating

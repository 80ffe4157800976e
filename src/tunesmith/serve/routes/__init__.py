"""The server's routes by family, each an `APIRouter` that `create_app` includes behind the API-key check:
`classify` (POST /classify) and `adapters` (POST /v1/load_lora_adapter, /v1/unload_lora_adapter). Routes find
what they serve on `request.app.state` (`engine`, `settings`), never in a closure, so each module can be read
and tested alone."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from ..app import APIError, ServeSettings
from ..schemas import BodyError, parse


async def read(request: Request, schema):
    """The validated body: refused (413) past the server's body limit before it is read in full, parsed in a
    worker thread, every problem a 400 naming the field."""
    limit = getattr(request.app.state, "settings", ServeSettings()).max_body_bytes
    too_big = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
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
    except ClientDisconnect:
        raise APIError(400, "The client closed the connection before sending the whole body.",
                       code="client_disconnected") from None
    try:
        body, _ = await run_in_threadpool(parse, bytes(body), schema)
    except BodyError as err:
        raise APIError(400, err.message, param=err.param, code=err.code) from None
    return body

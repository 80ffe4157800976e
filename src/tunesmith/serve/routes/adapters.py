"""Loading and unloading runs while serving, under vLLM's names and bodies: POST /v1/load_lora_adapter
`{"lora_name", "lora_path", "load_inplace"?}` and POST /v1/unload_lora_adapter `{"lora_name"}`, answered with
vLLM's plain-text "Success: ..." (errors in OpenAI's envelope). Any tunesmith run loads, peft or not, generative
or with a head; /v1/models lists it as soon as the answer arrives.

As in vLLM, a name already served is refused unless `load_inplace` is true, which swaps the new weights in
under the name. The base model can be neither replaced nor unloaded. A request the routes accepted carries the
model its name meant then (`Request.served`), so it finishes on it whatever happens to the name meanwhile,
while its prompt or response_format is still being prepared, as it waits or as it decodes; the next request
for the name gets a 404. A request queued by name alone is looked up when admitted, so an unload first waits
(up to UNLOAD_WAIT_S) until nothing waits in the engine's queue, then removes the name with no pause in
between; a queue that never empties is answered 409 and the model stays. Loads and unloads run one at a time
(a lock on `app.state`), so two loads can never both take one name."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..adapters import NameTaken, NotARun, NotServed, ServeError, check_loaded, check_name, register, remove_run
from ..backends import BACKENDS
from ..errors import APIError
from .common import read

router = APIRouter()
POLL_S = 0.05  # how often an unload looks at the engine's queue
UNLOAD_WAIT_S = 30.0  # how long an unload waits for the queue before answering 409


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False  # replace what is served under lora_name (vLLM's flag of the same name)


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's internal id: accepted and ignored (the name is the key here)


def _sentence(err: Exception) -> str:
    text = str(err)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _lock(request: Request) -> asyncio.Lock:
    state = request.app.state
    if getattr(state, "models_lock", None) is None:  # on the event loop: nothing can interleave here
        state.models_lock = asyncio.Lock()
    return state.models_lock


def waiting(engine, name: str) -> bool:
    """Whether a request for `name` may be waiting to be admitted: the engine's own count where it keeps one
    (`engine.queued(name)`), else whether anything at all waits."""
    if (count := getattr(engine, "queued", None)) is not None:
        return count(name) > 0
    return engine.stats().get("queued", 0) > 0


async def _queue_clear(engine, name: str) -> bool:
    """True once no request for `name` waits, at two looks POLL_S apart (a request taken off the queue at the
    first look has been admitted, its model looked up, by the second); False after UNLOAD_WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline, quiet = loop.time() + UNLOAD_WAIT_S, 0
    while True:
        quiet = 0 if waiting(engine, name) else quiet + 1
        if quiet == 2:
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(POLL_S)


@router.post("/v1/load_lora_adapter")
async def load_adapter(request: Request):
    body = await read(request, LoadRequest)
    engine, name = request.app.state.engine, body.lora_name
    async with _lock(request):
        try:
            check_name(engine, name, replace=body.load_inplace)
        except NameTaken as err:
            raise APIError(400, _sentence(err), param="lora_name", code="invalid_lora_name") from None
        try:
            load_served = BACKENDS[engine.backend].load_served  # llama-cpp: the run exported to GGUF, merged
            served = await run_in_threadpool(load_served, engine, name, body.lora_path)
        except NotARun as err:  # without a key, anyone may ask: the same words whether the path exists or not
            vague = request.app.state.settings.api_key is None
            raise APIError(400, _sentence(err.vague if vague else err), param="lora_path",
                           code="invalid_lora_path") from None
        except ServeError as err:
            raise APIError(400, _sentence(err), param="lora_path", code="invalid_lora_path") from None
        register(engine, name, served, replace=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_adapter(request: Request):
    body = await read(request, UnloadRequest)
    engine, name = request.app.state.engine, body.lora_name
    async with _lock(request):
        try:
            check_loaded(engine, name)
        except NotServed as err:
            raise APIError(404, _sentence(err), param="lora_name", code="model_not_found") from None
        except NameTaken as err:
            raise APIError(400, _sentence(err), param="lora_name", code="invalid_lora_name") from None
        if not await _queue_clear(engine, name):
            raise APIError(409, f"Requests for `{name}` are still waiting to be served after {UNLOAD_WAIT_S:g} s; "
                           "retry the unload.", param="lora_name", code="model_busy")
        remove_run(engine, name)  # right after the last look: no request can be queued in between
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

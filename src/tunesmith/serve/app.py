"""The OpenAI-compatible HTTP API over an `Engine`: built by `create_app(engine, settings)` so tests drive it
in-process and `tunesmith serve` runs it under uvicorn.

Every request is validated completely before anything is queued or streamed; every error leaves in
OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..data.tokenize import encode_chat_prompt
from ..generate import prompt_ids
from .conversations import ConversationStore, fit_history
from .engine import Engine, Event, QueueFull, Request
from .schemas import ChatRequest, CompletionRequest, ConversationCreate


@dataclass
class ServeSettings:
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer KEY`
    max_body_bytes: int = 1_000_000  # larger bodies are answered 413
    conversations: str = ":memory:"  # SQLite file for /v1/conversations
    completion_max_tokens: int = 16  # OpenAI's default for /v1/completions
    reply_reserve: int | None = None  # conversation reply budget without max_tokens (default: a quarter of the window)


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error"}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Job:
    """The engine requests of one API call (n choices per prompt) and the events coming back from them."""

    def __init__(self, engine: Engine):
        self.engine, self.loop = engine, asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.requests: list[Request] = []

    def emit(self, event: Event) -> None:  # called on the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def submit(self) -> None:
        try:
            self.engine.submit(self.requests)
        except QueueFull:
            raise APIError(429, "The server is busy; retry shortly.", code="queue_full",
                           type="rate_limit_error", headers={"Retry-After": "1"}) from None

    def cancel(self) -> None:
        for req in self.requests:
            req.cancelled.set()

    async def events(self):
        done = 0
        while done < len(self.requests):
            event = await self.queue.get()
            if event.error:
                raise APIError(500, f"generation failed: {event.error}", type="server_error")
            done += event.finish_reason is not None
            yield event


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc) -> str | None:
    """`messages.0.role` from a pydantic error location, without the union branch tags (`str`, `list[str]`)."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    return ".".join(parts) or None


def _sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    store = ConversationStore(settings.conversations)
    tokenizer, window = engine.tokenizer, engine.context_window

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()
        store.close()

    app = FastAPI(title="tunesmith", lifespan=lifespan)
    app.state.engine, app.state.store = engine, store

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err):  # FastAPI would answer 422; OpenAI answers 400
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        return APIError(400, first["msg"], param=_param(first["loc"][1:])).response()

    @app.exception_handler(HTTPException)
    async def _http(request, err):
        return APIError(err.status_code, str(err.detail), type=_TYPES.get(err.status_code, "invalid_request_error"),
                        headers=getattr(err, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(request, err):
        return APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").response()

    def check_key(request: HTTPRequest) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided." if given else "Missing API key: send "
                           "'Authorization: Bearer KEY'.", code="invalid_api_key", type="authentication_error")

    async def read(request: HTTPRequest, schema):
        """The body, size-checked before it is read in full, parsed as a JSON object and validated."""
        limit = settings.max_body_bytes
        too_big = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_big
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            data = json.loads(body)
        except ValueError:
            raise APIError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = _param(first["loc"])
            raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None

    def served(name: str):
        entry = engine.models.get(name)
        if entry is None:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        if entry.task != "sft":
            raise APIError(400, f"`{name}` is a {entry.task} run: it labels text and cannot generate it.",
                           param="model", code="model_not_generative")
        return entry

    def budget(n_prompt: int, max_tokens: int | None, default: int | None, param: str) -> int:
        if n_prompt >= window:
            raise APIError(400, f"This model's maximum context length is {window} tokens, but the {param} has "
                           f"{n_prompt} tokens, leaving no room for a reply.", param=param,
                           code="context_length_exceeded")
        if max_tokens is None:
            return min(default or window, window - n_prompt)
        if n_prompt + max_tokens > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens, but {n_prompt + max_tokens}"
                           f" were requested ({n_prompt} in the {param}, {max_tokens} for the completion). Reduce "
                           f"the {param} or max_tokens.", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def job_for(body, encoded: list[list[int]], max_tokens: list[int], logprobs: int | None) -> _Job:
        job = _Job(engine)
        for p, ids in enumerate(encoded):
            for j in range(body.n):  # n choices differ: seed + j (still reproducible for a fixed seed)
                job.requests.append(Request(
                    body.model, ids, max_tokens[p], job.emit, temperature=body.temperature, top_p=body.top_p,
                    seed=None if body.seed is None else body.seed + j, stop=body.stops,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    logprobs=logprobs, index=p * body.n + j))
        job.submit()
        return job

    def streaming(job: _Job, chunks, on_done=None) -> StreamingResponse:
        async def body():
            try:
                async for data in chunks:
                    yield _sse(data)
                if on_done:
                    on_done()
                yield "data: [DONE]\n\n"
            except APIError as err:
                yield _sse(json.loads(err.response().body))
            finally:
                job.cancel()  # the client went away (or we are done): stop generating at once
        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    router = APIRouter(dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @router.get("/v1/models")
    async def models():
        base = next(iter(engine.models))
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tunesmith", "root": base,
             "parent": None if name == base else base, "task": entry.task} for name, entry in engine.models.items()]}

    # -- completions ----------------------------------------------------------------------------------------
    @router.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read(request, CompletionRequest)
        served(body.model)
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported.", param="echo")
        prompts = body.prompts
        encoded = [prompt_ids(tokenizer, prompt=p) for p in prompts]
        limits = [budget(len(ids), body.max_tokens, settings.completion_max_tokens, "prompt") for ids in encoded]
        job = job_for(body, encoded, limits, body.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [prompts[c.index // body.n] if body.echo else "" for c in job.requests]
        offsets = [len(e) for e in echo]

        def logprobs(event: Event) -> dict | None:
            if body.logprobs is None or event.token is None:
                return None
            t = event.token
            out = {"tokens": [t.text], "token_logprobs": [t.logprob], "top_logprobs": [dict(t.top)],
                   "text_offset": [offsets[event.index]]}
            offsets[event.index] += len(t.text)
            return out

        def chunk(choices: list[dict], usage=None) -> dict:
            data = {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return data

        prompt_tokens = sum(len(ids) for ids in encoded)
        if body.stream:
            async def chunks():
                completion = 0
                for i, prefix in enumerate(echo):
                    if prefix:
                        yield chunk([{"index": i, "text": prefix, "logprobs": None, "finish_reason": None}])
                async for ev in job.events():
                    completion += ev.completion_tokens
                    lp = logprobs(ev)
                    if ev.text or ev.finish_reason or lp:  # text held back at a possible stop string: no chunk
                        yield chunk([{"index": ev.index, "text": ev.text, "logprobs": lp,
                                      "finish_reason": ev.finish_reason}])
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk([], _usage(prompt_tokens, completion))
            return streaming(job, chunks())

        texts, finish, lps, completion = list(echo), {}, {}, 0
        try:
            async for ev in job.events():
                texts[ev.index] += ev.text
                completion += ev.completion_tokens
                if (lp := logprobs(ev)) is not None:
                    merged = lps.setdefault(ev.index, {k: [] for k in lp})
                    for k, v in lp.items():
                        merged[k] += v
                if ev.finish_reason:
                    finish[ev.index] = ev.finish_reason
        finally:
            job.cancel()
        choices = [{"index": i, "text": texts[i], "logprobs": lps.get(i) if body.logprobs is not None else None,
                    "finish_reason": finish[i]} for i in range(len(texts))]
        return chunk(choices, _usage(prompt_tokens, completion))

    # -- chat -----------------------------------------------------------------------------------------------
    @router.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await read(request, ChatRequest)
        served(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens
        messages, conversation, key = body.plain_messages(), None, request.headers.get("idempotency-key")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.conversation is not None:
            conversation = store.get(body.conversation)
            if conversation is None:
                raise APIError(404, f"No conversation {body.conversation!r}.", param="conversation",
                               code="conversation_not_found")
            if body.n != 1:
                raise APIError(400, "A conversation continues with one reply: n must be 1.", param="n")
            if key and (stored := store.reply_for(conversation["id"], key)) is not None:
                return _replayed(body, rid, created, stored)  # an SDK retry: the turn is already written
            reserve = max_tokens or settings.reply_reserve or window // 4
            system = [{"role": "system", "content": conversation["system"]}] if conversation["system"] else []
            history = [{"role": m["role"], "content": m["content"]} for m in store.messages(conversation["id"])]
            fitted = fit_history(system, history, messages, lambda ms: len(encode_chat_prompt(
                tokenizer, ms, chat_template=engine.chat_template)), window - reserve)
            if fitted is None:
                raise APIError(400, f"The system prompt and the new messages leave no room for a {reserve}-token "
                               f"reply in the {window}-token context window.", param="messages",
                               code="context_length_exceeded")
            new, messages = messages, fitted
        try:
            ids = prompt_ids(tokenizer, messages=messages, chat_template=engine.chat_template)
        except Exception as err:  # a template that rejects this conversation (e.g. roles out of order)
            raise APIError(400, f"The chat template cannot render these messages: {err}", param="messages") from None
        limit = budget(len(ids), max_tokens, None, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = job_for(body, [ids], [limit], top)

        def logprobs(ev: Event):
            if top is None or ev.token is None:
                return None
            t = ev.token
            return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                                 "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())}
                                                  for s, v in t.top]}]}

        def save(text: str) -> None:
            if conversation is not None:
                store.add_turn(conversation["id"], new, text, key)

        def chunk(choices, usage=None):
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return data

        if body.stream:
            text = []

            async def chunks():
                completion = 0
                for i in range(body.n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for ev in job.events():
                    completion += ev.completion_tokens
                    text.append(ev.text)
                    lp = logprobs(ev)
                    if ev.text or ev.finish_reason or lp:
                        yield chunk([{"index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                                      "logprobs": lp, "finish_reason": ev.finish_reason}])
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk([], _usage(len(ids), completion))
            return streaming(job, chunks(), on_done=lambda: save("".join(text)))

        texts, finish, lps, completion = [""] * body.n, {}, {}, 0
        try:
            async for ev in job.events():
                texts[ev.index] += ev.text
                completion += ev.completion_tokens
                if (lp := logprobs(ev)) is not None:
                    lps.setdefault(ev.index, {"content": []})["content"] += lp["content"]
                if ev.finish_reason:
                    finish[ev.index] = ev.finish_reason
        finally:
            job.cancel()
        save(texts[0])
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": lps.get(i, {"content": []}) if top is not None else None,
                    "finish_reason": finish[i]} for i in range(body.n)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": choices, "usage": _usage(len(ids), completion)}

    # -- conversations --------------------------------------------------------------------------------------
    def conversation_or_404(cid: str) -> dict:
        found = store.get(cid)
        if found is None:
            raise APIError(404, f"No conversation {cid!r}.", param="conversation_id", code="conversation_not_found")
        return found

    @router.post("/v1/conversations")
    async def create_conversation(request: HTTPRequest):
        body = await read(request, ConversationCreate)
        if body.model is not None and body.model not in engine.models:
            raise APIError(404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found")
        return store.create(model=body.model, system=body.system, metadata=body.metadata)

    @router.get("/v1/conversations/{cid}")
    async def get_conversation(cid: str):
        return conversation_or_404(cid)

    @router.get("/v1/conversations/{cid}/messages")
    async def conversation_messages(cid: str):
        conversation_or_404(cid)
        return {"object": "list", "data": store.messages(cid)}

    @router.delete("/v1/conversations/{cid}")
    async def delete_conversation(cid: str):
        conversation_or_404(cid)
        store.delete(cid)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    app.include_router(router)
    return app


def _replayed(body: ChatRequest, rid: str, created: int, text: str):
    """The stored reply of a turn that was already written (same idempotency key), without generating again."""
    if body.stream:
        async def again():
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": None,
                                     "finish_reason": "stop"}]})
            yield "data: [DONE]\n\n"
        return StreamingResponse(again(), media_type="text/event-stream")
    return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": "stop"}], "usage": _usage(0, 0)}

"""The OpenAI-compatible HTTP API over an `Engine`: built by `create_app(engine, settings)` so tests drive it
in-process and `tunesmith serve` runs it under uvicorn.

Every request is validated completely before anything is queued or streamed; every error leaves in
OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for anything the
client can fix. CPU work that grows with the request (parsing, chat rendering, tokenization) runs in worker
threads, so one large request never stalls the event loop (other requests, /health)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..data.templates import render_chat
from ..data.tokenize import MaskError, encode_chat_prompt, stop_token_ids
from ..generation.grammar import ResponseFormatError, token_mask
from ..generate import prompt_ids
from .adapters import ServeError
from .conversations import ConversationStore, KeyReused, TurnGate, fit_history, pinned
from .engine import Engine, Event, QueueFull, Request, SamplingParams
from .schemas import BodyError, ChatRequest, CompletionRequest, ConversationCreate, error_param, parse

@dataclass
class ServeSettings:
    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer KEY`; no /docs
    max_body_bytes: int = 1_000_000  # larger bodies are answered 413
    conversations: str = ":memory:"  # SQLite file for /v1/conversations
    completion_max_tokens: int = 16  # OpenAI's default for /v1/completions
    chat_max_tokens: int = 1024  # chat reply budget without max_tokens, capped by what is left of the window
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


class _Prompts:
    """Prompt token ids, with the context window checked before tokenizing. No token covers more characters
    than the longest entry of the vocabulary, so a text of C characters has at least C / longest tokens: a
    prompt that certainly overflows the window is refused after rendering, without tokenizing it (tokenizing
    with special-token protection costs seconds for megabytes). Called in worker threads."""

    def __init__(self, engine: Engine):
        self.tokenizer, self.template, self.window = engine.tokenizer, engine.chat_template, engine.context_window
        self.longest = max(map(len, self.tokenizer.get_vocab()), default=1) or 1

    def budget(self, n_prompt: int, max_tokens: int | None, default: int | None, param: str, *,
               at_least: bool = False) -> int:
        """Tokens the reply may have; context_length_exceeded if the prompt (and max_tokens) do not fit."""
        window, size = self.window, f"at least {n_prompt}" if at_least else f"{n_prompt}"
        if n_prompt >= window:
            raise APIError(400, f"This model's maximum context length is {window} tokens, but the {param} has "
                           f"{size} tokens, leaving no room for a reply.", param=param, code="context_length_exceeded")
        if max_tokens is None:
            return min(default or window, window - n_prompt)
        if n_prompt + max_tokens > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens, but {size} tokens are in "
                           f"the {param} and {max_tokens} were requested for the completion. Reduce the {param} or "
                           "max_tokens.", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def _at_least(self, text: str) -> int:
        return -(-len(text) // self.longest)

    def _render(self, messages: list[dict]) -> str:
        try:
            return render_chat(self.tokenizer, messages, add_generation_prompt=True, chat_template=self.template)
        except Exception as err:  # a template that rejects this conversation (e.g. roles out of order)
            raise APIError(400, f"The chat template cannot render these messages: {err}", param="messages") from None

    def _encode(self, messages: list[dict]) -> list[int]:
        try:
            return encode_chat_prompt(self.tokenizer, messages, chat_template=self.template)
        except MaskError as err:  # content that could only be kept from forging a role by refusing it
            raise APIError(400, f"These messages cannot be encoded safely: {err}", param="messages") from None

    def count(self, messages: list[dict]) -> int:
        """Prompt tokens of `messages`, or a lower bound when that is already more than the window."""
        if (low := self._at_least(self._render(messages))) > self.window:
            return low
        return len(self._encode(messages))

    def chat(self, messages: list[dict], max_tokens: int | None = None) -> list[int]:
        self.budget(self._at_least(self._render(messages)), max_tokens, None, "messages", at_least=True)
        return self._encode(messages)

    def completion(self, prompt: str | list[int], max_tokens: int | None = None) -> list[int]:
        if not isinstance(prompt, str):  # token ids, as lm-evaluation-harness sends them
            if (bad := next((t for t in prompt if t >= len(self.tokenizer)), None)) is not None:
                raise APIError(400, f"The prompt's token ids must be below {len(self.tokenizer)} (this model's "
                               f"vocabulary); {bad} is not a token.", param="prompt")
            self.budget(len(prompt), max_tokens, None, "prompt")
            return list(prompt)
        self.budget(self._at_least(prompt), max_tokens, None, "prompt", at_least=True)
        ids = prompt_ids(self.tokenizer, prompt=prompt)
        if not ids:  # an empty prompt: generate from the start of a document, as OpenAI does
            start = next((t for t in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id) if t is not None), None)
            if start is None:
                raise APIError(400, "The prompt is empty and this model has no start-of-text token to begin from; "
                               "send some text.", param="prompt")
            ids = [start]
        return ids


class _Stream(StreamingResponse):
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


def _logit_bias(body, vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias ({"token id": bias}) with integer keys, each a token of this model's vocabulary."""
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise APIError(400, f"logit_bias keys are token ids from 0 to {vocab - 1}; {key!r} is not one.",
                           param="logit_bias")
        bias[int(key)] = value
    return bias


def _sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _fingerprint(data: dict) -> str:
    """What an idempotent retry must repeat: the whole body but how the reply is delivered (stream or not)."""
    content = {k: v for k, v in data.items() if k not in ("stream", "stream_options")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    if settings.api_key is not None and not settings.api_key.strip():
        raise ServeError("an empty API key would let anyone in: give a key, or None to serve without one")
    store, turns, prompts = ConversationStore(settings.conversations), TurnGate(), _Prompts(engine)
    window = engine.context_window

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()
        store.close()

    # With a key, the interactive docs go (a browser cannot send the key to them) and the schema needs the key.
    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if settings.api_key is not None else {}
    app = FastAPI(title="tunesmith", lifespan=lifespan, **docs)
    app.state.engine, app.state.store = engine, store

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err):  # FastAPI would answer 422; OpenAI answers 400
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        return APIError(400, first["msg"], param=error_param(first["loc"][1:])).response()

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
        """(validated body, its JSON object): size-checked before it is read in full, parsed in a thread."""
        limit = settings.max_body_bytes
        too_big = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        if not (request.headers.get("content-length") or "0").isdigit():
            raise APIError(400, "The Content-Length header must be a number of bytes.")
        if int(request.headers.get("content-length") or 0) > limit:
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
        try:
            return await run_in_threadpool(parse, bytes(body), schema)
        except BodyError as err:
            raise APIError(400, err.message, param=err.param, code=err.code) from None

    def fits(count: int) -> None:
        """A request for more completions than may ever wait at once is a client error, not a busy server."""
        if engine.max_queue and count > engine.max_queue:
            raise APIError(400, f"This request asks for {count} completions (prompts × n), but this server queues "
                           f"at most {engine.max_queue} at a time; ask for fewer.", param="n",
                           code="too_many_completions")

    def served(name: str):
        entry = engine.models.get(name)
        if entry is None:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        if entry.task != "sft":
            raise APIError(400, f"`{name}` is a {entry.task} run: it labels text and cannot generate it.",
                           param="model", code="model_not_generative")
        return entry

    def job_for(body, encoded: list[list[int]], max_tokens: list[int], logprobs: int | None, *,
                prompt_logprobs: int | None = None, mask=None) -> _Job:
        job = _Job(engine)
        bias = _logit_bias(body, len(engine.tokenizer))
        for p, ids in enumerate(encoded):
            params = SamplingParams(max_new_tokens=max_tokens[p], temperature=body.temperature, top_p=body.top_p,
                                    seed=body.seed, stop=body.stops, presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty, logit_bias=bias, logprobs=logprobs,
                                    prompt_logprobs=prompt_logprobs, n=body.n, token_mask=mask)
            for j, choice in enumerate(params.choices()):  # choice j is seeded with seed + j, as everywhere
                job.requests.append(Request(body.model, ids, choice, job.emit, index=p * body.n + j))
        job.submit()
        return job

    def json_mask(body: ChatRequest):
        """Constrained decoding for response_format json_object / json_schema (None for text): every reply
        parses, and validates against the schema. Compiled before the request is queued (cached per schema)."""
        if body.response_format is None or body.response_format.type == "text":
            return None
        module = engine.models[body.model].module
        vocab = module.get_output_embeddings().weight.shape[0]
        try:
            stops = stop_token_ids(engine.tokenizer, getattr(module, "generation_config", None))
            return token_mask(engine.tokenizer, body.response_format, vocab, eos_token_ids=sorted(stops))
        except ResponseFormatError as err:
            raise APIError(400, str(err), param="response_format") from None

    def streaming(job: _Job, chunks, on_done=None) -> _Stream:
        async def body():
            try:
                async for data in chunks:
                    yield _sse(data)
                if on_done:
                    on_done()
                yield "data: [DONE]\n\n"
            except APIError as err:
                yield _sse(json.loads(err.response().body))
        return _Stream(body(), on_close=[job.cancel])  # the client went away (or we are done): stop generating

    router = APIRouter(dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    if settings.api_key is not None:
        @router.get("/openapi.json", include_in_schema=False)
        async def openapi():
            return app.openapi()

    @router.get("/v1/models")
    async def models():
        base = next(iter(engine.models))
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tunesmith", "root": base,
             "parent": None if name == base else base, "task": entry.task} for name, entry in engine.models.items()]}

    # -- completions ----------------------------------------------------------------------------------------
    @router.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body, _ = await read(request, CompletionRequest)
        served(body.model)
        sources = body.prompts
        fits(len(sources) * body.n)
        encoded = await run_in_threadpool(lambda: [prompts.completion(p, body.max_tokens) for p in sources])
        limits = [prompts.budget(len(ids), body.max_tokens, settings.completion_max_tokens, "prompt")
                  for ids in encoded]
        # echo + logprobs scores the prompt itself (OpenAI's shape: the first token's logprob is null); with
        # max_tokens 0 that is all there is, which is how lm-evaluation-harness asks for log-likelihoods.
        scoring = body.logprobs if body.echo else None
        job = job_for(body, encoded, limits, body.logprobs, prompt_logprobs=scoring)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        shown = [p if isinstance(p, str) else engine.tokenizer.decode(ids) for p, ids in zip(sources, encoded)]
        echo = [shown[c.index // body.n] if body.echo else "" for c in job.requests]
        offsets = [len(e) for e in echo]

        def prompt_logprobs(event: Event) -> dict | None:
            if scoring is None or event.prompt is None:
                return None
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            at = 0
            for token_id, t in zip(encoded[event.index // body.n], event.prompt):
                text = t.text if t is not None else engine.tokenizer.decode([token_id])
                out["tokens"].append(text)
                out["token_logprobs"].append(None if t is None else t.logprob)
                out["top_logprobs"].append(None if t is None else dict(t.top))
                out["text_offset"].append(at)
                at += len(text)
            return out

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
                completion, echoed = 0, set()
                async for ev in job.events():
                    completion += ev.completion_tokens
                    if body.echo and ev.index not in echoed:  # the prompt first, with its logprobs if asked
                        echoed.add(ev.index)
                        yield chunk([{"index": ev.index, "text": echo[ev.index], "logprobs": prompt_logprobs(ev),
                                      "finish_reason": None}])
                        if ev.prompt is not None and not ev.finish_reason:
                            continue
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
                for lp in (prompt_logprobs(ev), logprobs(ev)):
                    if lp is not None:
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
        body, data = await read(request, ChatRequest)
        served(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
        fits(body.n)
        conversation, key = None, request.headers.get("idempotency-key")
        if body.conversation is not None:
            conversation = store.get(body.conversation)
            if conversation is None:
                raise APIError(404, f"No conversation {body.conversation!r}.", param="conversation",
                               code="conversation_not_found")
            if body.n != 1:
                raise APIError(400, "A conversation continues with one reply: n must be 1.", param="n")
        if conversation is None or not key:
            return await answer(body, conversation, None, None)
        if len(key) > 255:
            raise APIError(400, "The Idempotency-Key header is longer than 255 characters.",
                           code="invalid_idempotency_key")
        # One generation per (conversation, key): a concurrent retry waits here for the first to end.
        await turns.acquire(conversation["id"], key)
        try:
            response = await answer(body, conversation, key, _fingerprint(data))
        except BaseException:
            turns.release(conversation["id"], key)
            raise
        if isinstance(response, _Stream):  # the turn is written when the stream ends
            response.on_close.append(lambda: turns.release(conversation["id"], key))
        else:
            turns.release(conversation["id"], key)
        return response

    async def answer(body: ChatRequest, conversation: dict | None, key: str | None, fingerprint: str | None):
        max_tokens = body.max_completion_tokens or body.max_tokens
        messages = new = body.plain_messages()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if key:
            try:
                stored = store.reply_for(conversation["id"], key, fingerprint)
            except KeyReused:
                raise APIError(422, f"The Idempotency-Key {key!r} was already used in this conversation for a "
                               "request with another body; send a new key for a new request.",
                               code="idempotency_key_reused") from None
            if stored is not None:
                return _replayed(body, rid, created, stored)  # an SDK retry: the turn is already written
        if conversation is not None:
            reserve = max_tokens or settings.reply_reserve or window // 4
            messages = await run_in_threadpool(history_for, conversation, new, reserve)
        ids = await run_in_threadpool(prompts.chat, messages, max_tokens)
        limit = prompts.budget(len(ids), max_tokens, settings.chat_max_tokens, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = job_for(body, [ids], [limit], top, mask=await run_in_threadpool(json_mask, body))

        def logprobs(ev: Event):
            if top is None or ev.token is None:
                return None
            t = ev.token
            return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                                 "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())}
                                                  for s, v in t.top]}]}

        def save(text: str) -> None:
            if conversation is not None:
                store.add_turn(conversation["id"], new, text, key, fingerprint)

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

    def history_for(conversation: dict, new: list[dict], reserve: int) -> list[dict]:
        """The prompt messages of a conversation's next turn, trimmed to the window (in a worker thread)."""
        stored = [{"role": m["role"], "content": m["content"]} for m in store.messages(conversation["id"])]
        system, history = pinned(conversation["system"], stored)
        fitted = fit_history(system, history, new, prompts.count, window - reserve)
        if fitted is None:
            raise APIError(400, f"The system prompt and the new messages leave no room for a {reserve}-token "
                           f"reply in the {window}-token context window.", param="messages",
                           code="context_length_exceeded")
        return fitted

    # -- conversations --------------------------------------------------------------------------------------
    def conversation_or_404(cid: str) -> dict:
        found = store.get(cid)
        if found is None:
            raise APIError(404, f"No conversation {cid!r}.", param="conversation_id", code="conversation_not_found")
        return found

    @router.post("/v1/conversations")
    async def create_conversation(request: HTTPRequest):
        body, _ = await read(request, ConversationCreate)
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
    from .routes import adapters as adapter_routes, classify  # routes by family: they import APIError from here
    app.state.settings = settings
    app.include_router(classify.router, dependencies=[Depends(check_key)])
    app.include_router(adapter_routes.router, dependencies=[Depends(check_key)])
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

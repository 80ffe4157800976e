"""POST /v1/chat/completions: chat replies, n choices, streamed or not, optionally constrained to JSON by
response_format, with tools the model may call (serve/tools.py: the prompt, the grammar that forces a call,
and the reply's `tool_calls`), a thinking model's reasoning apart from its answer (serve/reasoning.py: the
template's variables, `reasoning_content`). With `conversation` the server keeps the history: the turn's prompt is
the stored history trimmed to the window, the reply (its calls and reasoning too) is stored when it ends, and an
Idempotency-Key makes a retry replay the stored reply instead of generating (and storing) a second one."""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ... import runs
from ..conversations import KeyReused
from ...generation import Event
from ..errors import APIError
from ..jobs import constraint, fits, grammar_work, job_for, served
from ..schemas import ChatRequest
from ..reasoning import ReplyReader, template_kwargs
from ..tools import ToolPlan
from .common import Reply, Stream, chunks_of, collect, read_json, sse, streaming, usage

router = APIRouter()


def _fingerprint(data: dict) -> str:
    """What an idempotent retry must repeat: the whole body but how the reply is delivered (stream or not)."""
    content = {k: v for k, v in data.items() if k not in ("stream", "stream_options")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@router.post("/v1/chat/completions")
async def chat(request: Request):
    state = request.app.state
    body, data = await read_json(request, ChatRequest)
    entry = served(state.engine, body.model)  # held from here: an unload meanwhile lets this request finish
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
    fits(state.engine, body.n)
    conversation, key = None, request.headers.get("idempotency-key")
    if body.conversation is not None:
        conversation = state.store.get(body.conversation)
        if conversation is None:
            raise APIError(404, f"No conversation {body.conversation!r}.", param="conversation",
                           code="conversation_not_found")
        if body.n != 1:
            raise APIError(400, "A conversation continues with one reply: n must be 1.", param="n")
    run = runs.find_run(entry.run or body.model)
    plan = ToolPlan.of(body, state.prompts.chat_template, run.tools if run else None, data)
    kwargs = template_kwargs(body, state.prompts.chat_template, run)
    if conversation is None or not key:
        return await answer(state, body, entry, plan, conversation, None, None, kwargs)
    if len(key) > 255:
        raise APIError(400, "The Idempotency-Key header is longer than 255 characters.",
                       code="invalid_idempotency_key")
    # One generation per (conversation, key): a concurrent retry waits here for the first to end.
    await state.turns.acquire(conversation["id"], key)
    try:
        response = await answer(state, body, entry, plan, conversation, key, _fingerprint(data), kwargs)
    except BaseException:
        state.turns.release(conversation["id"], key)
        raise
    if isinstance(response, Stream):  # the turn is written when the stream ends
        response.on_close.append(lambda: state.turns.release(conversation["id"], key))
    else:
        state.turns.release(conversation["id"], key)
    return response


async def answer(state, body: ChatRequest, entry, plan: ToolPlan, conversation: dict | None, key: str | None,
                 fingerprint: str | None, kwargs: dict | None = None):
    """The reply to a chat request by `entry` (the served model the request was accepted for), its prompt
    rendered with `kwargs` (the chat template's variables)."""
    engine, store, prompts, settings = state.engine, state.store, state.prompts, state.settings
    max_tokens = body.max_completion_tokens or body.max_tokens
    messages = new = body.prompt_messages()
    reply = Reply("chatcmpl", "chat.completion.chunk", body.model)
    if key:
        try:
            stored = store.reply_for(conversation["id"], key, fingerprint)
        except KeyReused:
            raise APIError(422, f"The Idempotency-Key {key!r} was already used in this conversation for a "
                           "request with another body; send a new key for a new request.",
                           code="idempotency_key_reused") from None
        if stored is not None:
            return _replayed(body, reply, stored)  # an SDK retry: the turn is already written
    if conversation is not None:
        reserve = max_tokens or settings.reply_reserve or prompts.window // 4
        messages = await run_in_threadpool(prompts.history, store, conversation, new, reserve, plan.tools, kwargs)
    ids = await run_in_threadpool(prompts.chat, messages, max_tokens, plan.tools, kwargs)
    reader = ReplyReader.of(plan, prompts.chat_template, engine.tokenizer, ids)
    limit = prompts.budget(len(ids), max_tokens, settings.chat_max_tokens, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    mask = await grammar_work(constraint, engine, body, plan, entry)
    job = job_for(engine, body, [ids], [limit], top, mask=mask, entry=entry)

    def logprobs(ev: Event):
        if top is None or ev.token is None:
            return None
        t = ev.token
        return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                             "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())}
                                              for s, v in t.top]}]}

    def save(record: dict) -> None:
        if conversation is not None:
            store.add_turn(conversation["id"], new, record, key, fingerprint)

    if body.stream:
        return _streamed(job, body, reader, reply, len(ids), logprobs, save)
    texts = [""] * body.n
    finish, lps, completion = await collect(job, texts, logprobs)
    replies = [reader.finish(texts[i], finish[i]) for i in range(body.n)]
    save(replies[0].record)
    choices = [{"index": i, "message": done.message,
                "logprobs": lps.get(i, {"content": []}) if top is not None else None,
                "finish_reason": done.reason} for i, done in enumerate(replies)]
    return reply(choices, usage(len(ids), completion, job.cached_tokens), object="chat.completion")


def _streamed(job, body: ChatRequest, reader: ReplyReader, reply: Reply, prompt_tokens: int, logprobs, save):
    """The reply as chunks: reasoning, then content and calls as they come (text that may begin a call or a
    think tag held back)."""
    streams = [reader.stream() for _ in range(body.n)]
    ends = {}

    def choices_for(ev: Event):
        stream, lp = streams[ev.index], logprobs(ev)
        for i, delta in enumerate(stream.feed(ev.text) or ([{}] if lp else [])):  # content, a call's chunks
            yield {"index": ev.index, "delta": delta, "logprobs": lp if i == 0 else None, "finish_reason": None}
        if ev.finish_reason:
            deltas, ends[ev.index] = stream.end(ev.finish_reason)
            for delta in deltas:
                yield {"index": ev.index, "delta": delta, "logprobs": None, "finish_reason": None}
            yield {"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ends[ev.index].reason}

    async def chunks():
        for i in range(body.n):
            yield reply([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for data in chunks_of(job, body, reply, prompt_tokens, choices_for):
            yield data
    return streaming(job, chunks(), on_done=lambda: save(ends[0].record))


def _replayed(body: ChatRequest, reply: Reply, message: dict):
    """The stored reply of a turn that was already written (same idempotency key), without generating again."""
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    if body.stream:
        async def again():
            delta = {"role": "assistant", "content": message["content"]}
            if "reasoning_content" in message:
                delta["reasoning_content"] = message["reasoning_content"]
            for i, call in enumerate(message.get("tool_calls") or []):
                delta.setdefault("tool_calls", []).append({"index": i, **call})
            yield sse(reply([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]))
            yield "data: [DONE]\n\n"
        return StreamingResponse(again(), media_type="text/event-stream")
    return reply([{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}], usage(0, 0),
                 object="chat.completion")

"""POST /v1/completions: text completions of one or more prompts (text or token ids), n choices each, streamed
or not. With echo and logprobs it scores the prompt itself, which is how lm-evaluation-harness asks for
log-likelihoods (max_tokens 0: the prompt's scores are all there is)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ...generation import Event
from ..jobs import fits, job_for, served
from ..schemas import CompletionRequest
from .common import Reply, chunks_of, collect, read, streaming, usage

router = APIRouter()


def _top(token) -> dict[str, float]:
    """A position's top_logprobs: the `logprobs` most likely tokens and the token itself, as OpenAI's completions
    ("up to logprobs + 1 elements") and vLLM give them, so `logprobs: 0` still shows each token's own."""
    top = dict(token.top)
    top.setdefault(token.text, token.logprob)
    return top


@router.post("/v1/completions")
async def completions(request: Request):
    state = request.app.state
    engine, prompts = state.engine, state.prompts
    body = await read(request, CompletionRequest)
    entry = served(engine, body.model)  # held from here: an unload meanwhile lets this request finish
    sources = body.prompts
    fits(engine, len(sources) * body.n)
    encoded = await run_in_threadpool(lambda: [prompts.completion(p, body.max_tokens) for p in sources])
    limits = [prompts.budget(len(ids), body.max_tokens, state.settings.completion_max_tokens, "prompt")
              for ids in encoded]
    # echo + logprobs scores the prompt itself (OpenAI's shape: the first token's logprob is null); with
    # max_tokens 0 that is all there is, which is how lm-evaluation-harness asks for log-likelihoods.
    scoring = body.logprobs if body.echo else None
    job = job_for(engine, body, encoded, limits, body.logprobs, prompt_logprobs=scoring, entry=entry)
    reply = Reply("cmpl", "text_completion", body.model)
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
            out["top_logprobs"].append(None if t is None else _top(t))
            out["text_offset"].append(at)
            at += len(text)
        return out

    def logprobs(event: Event) -> dict | None:
        if body.logprobs is None or event.token is None:
            return None
        t = event.token
        out = {"tokens": [t.text], "token_logprobs": [t.logprob], "top_logprobs": [_top(t)],
               "text_offset": [offsets[event.index]]}
        offsets[event.index] += len(t.text)
        return out

    prompt_tokens = sum(len(ids) for ids in encoded)
    if body.stream:
        echoed = set()

        def choices_for(ev: Event):
            if body.echo and ev.index not in echoed:  # the prompt first, with its logprobs if asked
                echoed.add(ev.index)
                yield {"index": ev.index, "text": echo[ev.index], "logprobs": prompt_logprobs(ev),
                       "finish_reason": None}
                if ev.prompt is not None and not ev.finish_reason:
                    return
            lp = logprobs(ev)
            if ev.text or ev.finish_reason or lp:  # text held back at a possible stop string: no chunk
                yield {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
        return streaming(job, chunks_of(job, body, reply, prompt_tokens, choices_for))

    texts = list(echo)
    finish, lps, completion = await collect(job, texts, prompt_logprobs, logprobs)
    choices = [{"index": i, "text": texts[i], "logprobs": lps.get(i) if body.logprobs is not None else None,
                "finish_reason": finish[i]} for i in range(len(texts))]
    return reply(choices, usage(prompt_tokens, completion, job.cached_tokens))

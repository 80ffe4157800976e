"""How one API call becomes engine requests, and how their events come back: the model it names must generate,
the completions it asks for must fit the queue, its sampling fields become `SamplingParams` (n choices per
prompt, choice j seeded with seed + j), and a forced tool call or response_format becomes a token mask. Shared
by /v1/completions and /v1/chat/completions; no HTTP here, only `APIError`s to answer."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ..generation.grammar import ResponseFormatError, token_mask
from ..generation import Engine, Event, QueueFull, Request, SamplingParams
from .errors import APIError


class Job:
    """The engine requests of one API call (n choices per prompt) and the events coming back from them."""

    def __init__(self, engine: Engine):
        self.engine, self.loop = engine, asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.requests: list[Request] = []
        self.n = 1  # choices per prompt
        self.cached: dict[int, int] = {}  # request index -> prompt tokens its KV came from the prefix cache for
        # echo + logprobs with n > 1: each prompt is scored once, by its choice 0, and its scores given to the
        # other choices' first events (held until they are known)
        self.shared_scores = False
        self._scores: dict[int, list] = {}  # prompt -> its scores
        self._held: dict[int, list[Event]] = {}  # prompt -> events of its other choices, waiting for them
        self._scored: set[int] = set()  # request indices given their scores

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

    @property
    def cached_tokens(self) -> int:
        """usage.prompt_tokens_details.cached_tokens: per prompt, counted once like its prompt_tokens (its first
        choice's)."""
        return sum(n for index, n in self.cached.items() if index % self.n == 0)

    async def events(self):
        done = 0
        while done < len(self.requests):
            event = await self.queue.get()
            if event.error:
                raise APIError(500, f"generation failed: {event.error}", type="server_error")
            for ready in self._with_scores(event):
                if ready.finish_reason is not None:
                    done += 1
                    self.cached[ready.index] = ready.cached_tokens
                yield ready

    def _with_scores(self, event: Event) -> list[Event]:
        """`event`, and what it lets go: with shared scores, a choice's first event carries its prompt's scores,
        so the other choices' events wait until choice 0 has scored the prompt."""
        if not self.shared_scores:
            return [event]
        prompt, choice = divmod(event.index, self.n)
        if choice == 0:
            if event.prompt is None:
                return [event]
            self._scores[prompt] = event.prompt
            return [event] + [self._scored_first(e) for e in self._held.pop(prompt, [])]
        if prompt not in self._scores:
            self._held.setdefault(prompt, []).append(event)
            return []
        return [self._scored_first(event)]

    def _scored_first(self, event: Event) -> Event:
        if event.index in self._scored:
            return event
        self._scored.add(event.index)
        return replace(event, prompt=self._scores[event.index // self.n])


GRAMMAR_THREADS = 8  # requests whose grammars are checked or compiled at once (one compiles, grammar_cache.py)
_GRAMMARS = ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="tunesmith-grammar")


async def grammar_work(fn, *args):
    """`fn(*args)` on the grammar threads: a schema compiling for seconds holds neither the event loop, nor the
    engine's thread, nor the threads that parse request bodies (a request waiting its turn to compile holds
    no thread of those either)."""
    return await asyncio.wrap_future(_GRAMMARS.submit(fn, *args))


def served(engine: Engine, name: str):
    """The served entry of a model that generates text; 404 for an unknown name, 400 for a run with a head."""
    entry = engine.models.get(name)
    if entry is None:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
    if entry.task != "sft":
        raise APIError(400, f"`{name}` is a {entry.task} run: it labels text and cannot generate it.",
                       param="model", code="model_not_generative")
    return entry


def fits(engine: Engine, count: int) -> None:
    """A request for more completions than may ever wait at once is a client error, not a busy server."""
    if engine.max_queue and count > engine.max_queue:
        raise APIError(400, f"This request asks for {count} completions (prompts × n), but this server queues "
                       f"at most {engine.max_queue} at a time; ask for fewer.", param="n",
                       code="too_many_completions")


def logit_bias(body, vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias ({"token id": bias}) with integer keys, each a token of this model's vocabulary."""
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        # Compared as text first: int() refuses more than 4,300 digits (Python's integer-string limit).
        digits = key.lstrip("0") if key.isascii() and key.isdigit() else None
        if digits is None or len(digits) > len(str(vocab)) or int(digits or "0") >= vocab:
            shown = key if len(key) <= 20 else f"{key[:20]}... ({len(key)} characters)"
            raise APIError(400, f"logit_bias keys are token ids from 0 to {vocab - 1}; {shown!r} is not one.",
                           param="logit_bias")
        bias[int(digits or "0")] = value
    return bias


def constraint(engine: Engine, body, plan=None, entry=None):
    """Constrained decoding: a forced tool call (tool_choice "required" or a named function: the call parses
    and its arguments validate), else response_format json_object / json_schema (every reply parses, and
    validates against the schema), else None. Compiled before the request is queued (cached per grammar), for
    `entry`, the served model the route accepted the request for (default: the one named now)."""
    spec = plan.grammar() if plan is not None else None
    if spec is None:
        if body.response_format is None or body.response_format.type == "text":
            return None
        spec = body.response_format
    vocab, stops = engine.vocabulary(entry if entry is not None else body.model)
    try:
        return token_mask(engine.tokenizer, spec, vocab, eos_token_ids=sorted(stops))
    except ResponseFormatError as err:
        raise APIError(400, str(err), param="response_format" if spec is body.response_format else "tools") from None


def job_for(engine: Engine, body, encoded: list[list[int]], max_tokens: list[int], logprobs: int | None, *,
            prompt_logprobs: int | None = None, mask=None, entry=None) -> Job:
    """Queue body.n choices for each prompt of `encoded` (choice j of prompt p has index p * n + j), for `entry`,
    the served model the route accepted the call for: it answers the call even if its name is unloaded while
    the call is being prepared or waits (an accepted request finishes; the next one gets a 404)."""
    job = Job(engine)
    job.n = body.n
    bias = logit_bias(body, len(engine.tokenizer))
    job.shared_scores = prompt_logprobs is not None and body.n > 1
    for p, ids in enumerate(encoded):
        params = SamplingParams(max_new_tokens=max_tokens[p], temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop=body.stops, presence_penalty=body.presence_penalty,
                                frequency_penalty=body.frequency_penalty, logit_bias=bias, logprobs=logprobs,
                                prompt_logprobs=prompt_logprobs, n=body.n, token_mask=mask)
        for j, choice in enumerate(params.choices()):  # choice j is seeded with seed + j, as everywhere
            if j and job.shared_scores:  # scored once, by choice 0 (with max_tokens 0 the others cost nothing)
                choice = replace(choice, prompt_logprobs=None)
            job.requests.append(Request(body.model, ids, choice, job.emit, index=p * body.n + j, served=entry))
    job.submit()
    return job

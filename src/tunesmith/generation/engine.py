"""The engine every caller generates through: `generate`/`stream`/`generate_batch` (the CLI, the terminal chat,
evaluation) run it in their own thread with `step()`; the server runs it on a worker thread (`start()`).

Continuous batching: each `step()` first admits waiting requests while fewer than `max_batch` rows run (their
prefill runs, each picks its first token, then they join the running group of their model), then runs one
decode step for one group; a row that finishes, fails or is cancelled leaves its group at once. Groups (see
batch.py: rows that can share a forward pass) take turns, one step each.

Requests wait in one bounded list until admitted: at most `max_queue` at any time (`QueueFull` beyond; 0 = no
bound). Results come back as `Event`s through each request's `emit` callback, called on the engine's thread.
A row whose settings, sampling or callback fail gets an error event and leaves; the others go on."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from ..batching import device_of
from ..data.tokenize import stop_token_ids
from .batch import Group, Route, prefill, route
from .params import SamplingParams
from .sampler import Sampler, Token, prompt_logprobs
from .text import Detokenizer, StopScanner


class QueueFull(Exception):
    """The request queue is full: the server answers 429."""


@dataclass
class Served:
    """One servable model name: a model object, plus the peft adapter to activate on it (None = the base)."""

    module: object
    adapter: str | None = None
    task: str = "sft"  # "sft" generates text; "classify"/"ner" runs are listed but do not generate
    use_cache: bool = True  # unused: every run decodes with the KV cache (prompt-learning runs too)
    run: str | None = None
    as_is: bool = False  # use the module exactly as the caller left it (the Python API): no adapter switching

    def activate(self):
        """Context in which `module` behaves as this name: its adapter active, or every adapter disabled."""
        if self.as_is:
            return nullcontext()
        if self.adapter is not None:
            self.module.set_adapter(self.adapter)
            return nullcontext()
        if hasattr(self.module, "disable_adapter") and hasattr(self.module, "peft_config"):
            return self.module.disable_adapter()
        return nullcontext()

    def route(self) -> Route:
        return route(self.module, self.adapter, as_is=self.as_is, activate=self.activate)


@dataclass
class Event:
    index: int = 0  # which of a request's n choices
    text: str = ""  # new text, already cut at stop strings
    token: Token | None = None  # with logprobs: the token this event's text came from
    finish_reason: str | None = None  # on the last event of a choice, which carries no text: "stop" or "length"
    prompt_tokens: int = 0  # on the last event
    completion_tokens: int = 0  # on the last event: generated tokens, a final stop token included
    error: str | None = None
    prompt: list[Token | None] | None = None  # with prompt_logprobs, on the first event: per prompt token (first None)


class Request:
    """One reply to generate: the prompt's token ids, its SamplingParams, and `emit`, which receives its Events.

    `params` may be given as the reply's maximum length with the other settings as keywords, which build the
    SamplingParams: `Request(model, ids, 16, emit, temperature=0.7)` (temperature 1.0, OpenAI's default, unless
    given). Set `cancelled` to drop the row at its next step, without another event."""

    def __init__(self, model: str, ids: list[int], params: SamplingParams | int, emit: Callable[[Event], None], *,
                 index: int = 0, cancelled: threading.Event | None = None, **settings):
        if not isinstance(params, SamplingParams):
            params = SamplingParams(max_new_tokens=params, **{"temperature": 1.0, **settings})
        elif settings:
            raise TypeError("give the settings in params or as keywords, not both")
        self.model, self.ids, self.params, self.emit, self.index = model, ids, params, emit, index
        self.cancelled = cancelled or threading.Event()

    @property
    def max_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def seed(self) -> int | None:
        return self.params.seed

    def __repr__(self):
        return f"Request({self.model!r}, {len(self.ids)} prompt tokens, index={self.index})"


def fail(req: Request, error: str) -> None:
    """End `req` with an error event; a callback that fails too is ignored (its client is gone)."""
    try:
        req.emit(Event(req.index, error=error))
    except Exception:
        pass


class Row:
    """Decoding state of one request: its route, sampler, text so far, and the last token it picked."""

    def __init__(self, req: Request, route: Route, tokenizer, vocab: int, stops: set[int]):
        self.req, self.route, self.stops = req, route, stops
        self.sampler = Sampler(req.params, req.ids, vocab, tokenizer)
        self.text = Detokenizer(tokenizer)
        self.scanner = StopScanner(req.params.stop)
        self.n = 0  # completion tokens, a final stop token included
        self.last: int | None = None

    @property
    def tokens(self) -> list[int]:
        """The ids generated so far, without a final stop token."""
        return self.text.tokens

    def pick(self, logits) -> tuple[int, Token | None]:
        """The next token for this row's logits [V] (float32, CPU)."""
        return self.sampler.pick(logits, self)

    def advance(self, token: int, info: Token | None) -> bool:
        """Record a picked token and emit what it adds; True when this row has finished."""
        self.n, self.last = self.n + 1, token
        if token in self.stops:
            return self._finish("stop", self.scanner.feed(self.text.flush()))
        out = self.scanner.feed(self.text.add(token))
        if self.scanner.stopped:
            return self._finish("stop", out, info)
        if self.n >= self.req.params.max_new_tokens:
            return self._finish("length", out + self.scanner.feed(self.text.flush()), info)
        self._emit(Event(self.req.index, out, info))
        return False

    def _emit(self, event: Event) -> None:
        if event.text or event.token or event.finish_reason:
            self.req.emit(event)

    def _finish(self, reason: str, text: str, info: Token | None = None) -> bool:
        if not self.scanner.stopped:  # the end: a held-back tail that never became a stop string is text
            text += self.scanner.flush()
        elif reason == "length":
            reason = "stop"  # the last token completed a stop string
        self._emit(Event(self.req.index, text, info))
        if not self.req.cancelled.is_set():
            self.req.emit(Event(self.req.index, finish_reason=reason, prompt_tokens=len(self.req.ids),
                                completion_tokens=self.n))
        return True


def generating(models: dict[str, Served], req: Request) -> Served:
    """The served model a generation request names, or a ValueError that says why it cannot generate."""
    try:
        served = models[req.model]  # [] not get(): a run unloaded while this waited still resolves
    except KeyError:
        raise ValueError(f"the model {req.model!r} is not served (any more)") from None
    if served.task != "sft":
        raise ValueError(f"{req.model!r} is a {served.task} run and cannot generate text")
    if not req.ids:
        raise ValueError("the prompt has no tokens to continue from")
    return served


class Engine:
    """Generates for several model names that may share one loaded base model (see `Served`)."""

    backend = "torch"  # which decoder computes the logits (`tunesmith serve --backend`)

    def __init__(self, models: dict[str, Served], tokenizer, *, context_window: int | None = None,
                 chat_template: str | None = None, max_batch: int = 8, max_queue: int = 64,
                 batch_wait_s: float = 0.005, device: str | None = None):
        from .device import place

        self.models, self.tokenizer, self.chat_template = models, tokenizer, chat_template
        if device is not None:  # None: the models stay where they are
            for served in models.values():
                served.module = place(served.module, device)
        first = next(iter(models.values())).module
        self.context_window = context_window or getattr(getattr(first, "config", None), "max_position_embeddings",
                                                        None) or 2048
        self.max_batch, self.max_queue, self.batch_wait_s = max(max_batch, 1), max_queue, batch_wait_s
        self._waiting: deque[Request] = deque()  # submitted, not yet admitted: at most max_queue (0 = no bound)
        self._changed = threading.Condition()  # guards _waiting and _stopping
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._groups: dict[tuple, Group] = {}  # running rows by route key; only the engine's thread touches it
        self._turn = 0  # which group decodes next
        self._running = 0  # rows in the groups, counted by the engine's thread after each change
        self._admitting: list[Request] = []  # between the waiting list and a group (being prefilled)
        self.threaded = True  # False: the caller drives step() itself (the Python API), no worker thread

    @classmethod
    def for_model(cls, model, tokenizer, **options) -> Engine:
        """An engine over one model as the caller left it (active adapter included), for the Python API."""
        engine = cls({"model": Served(model, as_is=True)}, tokenizer, max_queue=0, **options)
        engine.threaded = False
        return engine

    # -- submitting -----------------------------------------------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all n choices of one API call), all or none; QueueFull if there is no room for all."""
        with self._changed:
            if any(r.cancelled.is_set() for r in self._waiting):  # abandoned while waiting: free their places
                self._waiting = deque(r for r in self._waiting if not r.cancelled.is_set())
            if self.max_queue and len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull
            self._waiting.extend(requests)
            self._changed.notify()
        if self.threaded:
            self.start()

    def stats(self) -> dict:
        return {"running": self._running + len(self._admitting), "queued": len(self._waiting)}

    def in_flight(self, model: str) -> int:
        """Requests for the model name `model` still waiting or running (its weights are still needed)."""
        with self._changed:
            waiting = sum(r.model == model for r in self._waiting)
        running = [row.req for group in list(self._groups.values()) for row in list(group.rows)]
        return waiting + sum(req.model == model for req in running + list(self._admitting))

    def vocabulary(self, name: str) -> tuple[int, set[int]]:
        """(the logits' width, the stop token ids) of the served model `name`: what a token mask is built for."""
        module = self.models[name].module
        return (module.get_output_embeddings().weight.shape[0],
                stop_token_ids(self.tokenizer, getattr(module, "generation_config", None)))

    @property
    def running(self) -> int:
        return self.stats()["running"]

    @property
    def busy(self) -> bool:
        return bool(self._groups or self._waiting)

    # -- the server's worker thread -------------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._stopping = False
            self._worker = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        """End the worker after its current step; running and waiting requests get an error event."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._worker is not None and self._worker.is_alive():
            self._worker.join(timeout=30)
        self._worker = None
        with self._changed:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting + [row.req for group in self._groups.values() for row in group.rows]:
            fail(req, "the server is shutting down")
        self._groups.clear()
        self._running = 0

    def _loop(self) -> None:
        while True:
            with self._changed:
                idle = not self._groups
                while not self._waiting and not self._groups and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
            if idle and self.max_batch > 1:
                time.sleep(self.batch_wait_s)  # let requests sent together arrive together
            try:
                self.step()
            except Exception as err:  # a bug must not take the worker down: fail what runs, keep serving
                for group in self._groups.values():
                    for row in group.rows:
                        fail(row.req, f"{type(err).__name__}: {err}")
                self._groups.clear()
                self._running = 0

    # -- scheduling -----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit what fits, then one decode step of the next group. True while anything runs or waits.

        The worker thread calls this; the Python API calls it in its own thread on an engine it never started."""
        import torch

        with torch.inference_mode():
            admitted = self._admit()
            if admitted:
                self._admitting = admitted
                try:
                    self._run(admitted)
                finally:
                    self._running, self._admitting = sum(map(len, self._groups.values())), []
            if self._groups:
                keys = list(self._groups)
                self._turn = (self._turn + 1) % len(keys)
                self._decode(keys[self._turn])
            self._running = sum(map(len, self._groups.values()))
        return self.busy

    def _admit(self) -> list[Request]:
        """The oldest waiting requests that fit beside the running rows."""
        room = self.max_batch - sum(map(len, self._groups.values()))
        with self._changed:
            taken = []
            while self._waiting and len(taken) < room:
                req = self._waiting.popleft()
                if not req.cancelled.is_set():
                    taken.append(req)
            return taken

    def _run(self, batch: list[Request]) -> None:
        """Start newly admitted requests: prefill those that run alike together, pick each one's first token,
        and let the rows that go on join their group."""
        together: dict[tuple, list[tuple[Request, Route]]] = {}
        for req in batch:
            try:
                path = generating(self.models, req).route()
            except Exception as err:
                fail(req, f"{type(err).__name__}: {err}")
                continue
            if req.params.max_new_tokens == 0 and req.params.prompt_logprobs is None:  # the prompt's usage only
                req.emit(Event(req.index, finish_reason="length", prompt_tokens=len(req.ids)))
                continue
            # Virtual tokens come from the adapter, so prompt-learning rows prefill per model name.
            together.setdefault(path.key + ((req.model,) if path.virtual else ()), []).append((req, path))
        for items in together.values():
            rows = []
            for req, path in items:
                try:
                    rows.append(self._row(req, path))
                except Exception as err:  # e.g. a logit_bias outside the vocabulary: this request alone
                    fail(req, f"{type(err).__name__}: {err}")
            if rows:
                self._prefill(rows)

    def _row(self, req: Request, path: Route) -> Row:
        decoder = path.decoder
        head = decoder.get_output_embeddings() if hasattr(decoder, "get_output_embeddings") else None
        vocab = head.weight.shape[0] if head is not None else decoder.config.vocab_size  # the logits' width
        stops = stop_token_ids(self.tokenizer, getattr(decoder, "generation_config", None))
        return Row(req, path, self.tokenizer, vocab, stops)

    def _prefill(self, rows: list[Row]) -> None:
        path = rows[0].route
        mixed = [r.route.adapter_name for r in rows] if path.adapter_name is not None else None
        stops = rows[0].stops
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(stops, default=0)
        scored = [i for i, r in enumerate(rows) if r.req.params.prompt_logprobs is not None]
        try:
            cache, mask, logits, every = prefill(path, [r.req.ids for r in rows], mixed, pad_id,
                                                 device_of(path.decoder), every_position=bool(scored))
        except Exception as err:  # the forward pass itself: these rows fail, the running ones go on
            for row in rows:
                fail(row.req, f"{type(err).__name__}: {err}")
            return
        done = self._score([rows[i] for i in scored], every[scored]) if scored else set()
        keep = self._pick(rows, logits, skip={scored[i] for i in done})
        if keep:
            joining = Group(path)
            joining.add(rows, cache, mask)
            joining.keep(keep)
            self._groups.setdefault(path.key, Group(path)).add(joining.rows, joining.cache, joining.mask)

    def _score(self, rows: list[Row], logits) -> set[int]:
        """Emit each row's prompt logprobs (echo + logprobs), before its reply's first token; logits [B, T, V] of
        the left-padded prompt columns. The indices of the rows that end here (max_tokens 0, or failed)."""
        done = set()
        for i, row in enumerate(rows):
            req = row.req
            try:
                scores = prompt_logprobs(logits[i, logits.shape[1] - len(req.ids):], req.ids,
                                         req.params.prompt_logprobs, self.tokenizer)
                req.emit(Event(req.index, prompt=scores))
                if req.params.max_new_tokens == 0:  # scored, nothing to generate
                    done.add(i)
                    req.emit(Event(req.index, finish_reason="length", prompt_tokens=len(req.ids)))
            except Exception as err:
                done.add(i)
                fail(req, f"{type(err).__name__}: {err}")
        return done

    def _decode(self, key: tuple) -> None:
        group = self._groups[key]
        group.keep([i for i, row in enumerate(group.rows) if not row.req.cancelled.is_set()])
        if group.rows:
            try:
                logits = group.step()
            except Exception as err:  # the forward pass: this group's rows fail, other groups go on
                for row in group.rows:
                    fail(row.req, f"{type(err).__name__}: {err}")
                group.keep([])
            else:
                group.keep(self._pick(group.rows, logits))
        if not group.rows:
            del self._groups[key]

    def _pick(self, rows: list[Row], logits, skip: set = frozenset()) -> list[int]:
        """Each row picks and records its token from logits [B, V]; the indices of the rows that go on."""
        keep = []
        for i, row in enumerate(rows):
            if row.req.cancelled.is_set() or i in skip:
                continue  # the client went away: drop the row without a word
            try:
                token, info = row.pick(logits[i])
                finished = row.advance(token, info)
            except Exception as err:  # this row's settings or callback: it fails alone
                fail(row.req, f"{type(err).__name__}: {err}")
                continue
            if not finished and not row.req.cancelled.is_set():  # cancelled from its own callback: gone now
                keep.append(i)
        return keep

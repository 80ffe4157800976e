"""The engine every caller generates through: `generate`/`stream`/`generate_batch` (the CLI, the terminal chat,
evaluation) run it in their own thread with `step()`; the server runs it on a worker thread (`start()`).

The one scheduler, over a pluggable decoder (decoder.py: torch in batch.py, llama.cpp in llamacpp.py): the
engine keeps the waiting list, admission, the rows, sampling, stop strings and events; the decoder computes
logits. Continuous batching, each `step()`:
1. admits the oldest waiting requests while fewer than `max_batch` rows run and the decoder has room for them
   (one that does not fit yet waits, and so do those behind it: first come, first served); the decoder places
   each, starting it from the KV of the longest prefix of its prompt that it has cached (prefix_cache.py);
2. feeds each row still reading its prompt its next piece, at most `prefill_chunk` tokens (chunked prefill: a
   long prompt does not stall the rows decoding beside it); a row whose prompt is in picks its first token;
3. runs one decode step for every decoding row, which picks and records its next token.
Rows with the same `key` share each forward pass. A row that finishes, fails or is cancelled leaves at once, and
its KV stays in the decoder's prefix cache for the next request that begins with its tokens.

Requests wait in one bounded list until admitted: at most `max_queue` at any time (`QueueFull` beyond; 0 = no
bound). Results come back as `Event`s through each request's `emit` callback, called on the engine's thread.
A row whose settings, sampling or callback fail gets an error event and leaves; the others go on."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import count

from .batch import Route, TorchDecoder, route
from .decoder import Decoder
from .params import ConstraintFailed, SamplingParams
from .prefix_cache import DEFAULT_MB
from .sampler import Sampler, Token, prompt_logprobs
from .text import Detokenizer, StopScanner

log = logging.getLogger(__name__)
PREFILL_CHUNK = 256  # prompt tokens a row reads per step: a step that also decodes others stays short
# Rows decoded together by default. 16 clients streaming 64-token replies on a 2-core CPU (benchmarks/serve_load.py,
# llama_server_anchor.py; docs/benchmarks.md): at 8, half the clients wait for the first half's replies (p90 time to
# first token 7.9 s on the AMD EPYC, 4.3 s on the Xeon with llama.cpp; llama-server serves 16 slots at once); at 16
# the same load's p90 was 1.09 s and its throughput 6.7x one client rather than 4.0x. One more row costs a torch
# row's KV (SmolLM2: 46 KB a token) and nothing on llama.cpp (one unified cache of the context window).
MAX_BATCH = 16
_UIDS = count()


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
    # Whose KV a cached prefix is: never reused for another Served, even one given the same name or adapter later.
    uid: int = field(default_factory=_UIDS.__next__, init=False, repr=False, compare=False)

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
    # on the last event of a choice, which carries no text: "stop", "length", or "grammar_error" (its token mask
    # could not go on: params.ConstraintFailed)
    finish_reason: str | None = None
    prompt_tokens: int = 0  # on the last event
    completion_tokens: int = 0  # on the last event: generated tokens, a final stop token included
    cached_tokens: int = 0  # on the last event: prompt tokens whose KV came from the prefix cache
    error: str | None = None
    prompt: list[Token | None] | None = None  # with prompt_logprobs, on the first event: per prompt token (first None)


class Request:
    """One reply to generate: the prompt's token ids, its SamplingParams, and `emit`, which receives its Events.

    `params` may be given as the reply's maximum length with the other settings as keywords, which build the
    SamplingParams: `Request(model, ids, 16, emit, temperature=0.7)` (temperature 1.0, OpenAI's default, unless
    given). Set `cancelled` to drop the row at its next step, without another event. `served`: the model the
    name meant when the request was accepted (the server's routes pass it, so a run unloaded while the request
    was being prepared or waited still answers it); None: the name is looked up at admission."""

    def __init__(self, model: str, ids: list[int], params: SamplingParams | int, emit: Callable[[Event], None], *,
                 index: int = 0, cancelled: threading.Event | None = None, served: Served | None = None,
                 **settings):
        if not isinstance(params, SamplingParams):
            params = SamplingParams(max_new_tokens=params, **{"temperature": 1.0, **settings})
        elif settings:
            raise TypeError("give the settings in params or as keywords, not both")
        self.model, self.ids, self.params, self.emit, self.index = model, ids, params, emit, index
        self.cancelled = cancelled or threading.Event()
        self.served = served

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
    """Decoding state of one request: its served model, sampler, text so far, the tokens it picked, and what its
    decoder has fed into its KV cache."""

    def __init__(self, req: Request, served: Served, tokenizer, vocab: int, stops: set[int]):
        self.req, self.served, self.stops = req, served, stops
        self.sampler = Sampler(req.params, req.ids, vocab, tokenizer)
        self.text = Detokenizer(tokenizer)
        self.scanner = StopScanner(req.params.stop)
        self.n = 0  # completion tokens, a final stop token included
        self.last: int | None = None
        self.picked: list[int] = []  # every token picked, a final stop token included
        self.key = None  # rows with equal keys share forward passes (the decoder's choice)
        self.slot = None  # the decoder's record of where this row's KV lives
        self.fed = 0  # tokens in its KV cache: the prompt's first ones, then those picked
        self.cached = 0  # prompt tokens whose KV came from the prefix cache
        self.scores: list = []  # a scoring row's prompt logprobs (Tokens), each piece's as it is read
        self.ended = False
        # The text given to the stop scanner, in characters, and how much of it was passed on; with logprobs, the
        # (start, Token) of each token whose text is not passed on yet (held back as a stop string's possible start).
        self.scanned = self.passed = 0
        self.held: deque[tuple[int, Token]] = deque()

    @property
    def tokens(self) -> list[int]:
        """The ids generated so far, without a final stop token."""
        return self.text.tokens

    @property
    def prefilling(self) -> bool:
        """Part of its prompt is not in its KV cache yet."""
        return self.fed < len(self.req.ids)

    @property
    def scoring(self) -> bool:
        """It reports its prompt's logprobs (echo + logprobs): its prefill keeps the logits of every position."""
        return self.req.params.prompt_logprobs is not None

    def fed_ids(self) -> list[int]:
        """The tokens whose KV its cache holds, in order."""
        return (self.req.ids + self.picked)[:self.fed]

    def pick(self, logits) -> tuple[int, Token | None]:
        """The next token for this row's logits [V] (float32, CPU)."""
        return self.sampler.pick(logits, self)

    def advance(self, token: int, info: Token | None) -> bool:
        """Record a picked token and emit what it adds; True when this row has finished."""
        self.n, self.last = self.n + 1, token
        self.picked.append(token)
        if token in self.stops:
            return self._finish("stop", self._scan(self.text.flush()))
        out = self._scan(self.text.add(token), info)
        if self.scanner.stopped:
            return self._finish("stop", out)
        if self.n >= self.req.params.max_new_tokens:
            return self._finish("length", out + self._scan(self.text.flush()))
        self._pass_on(out)
        return False

    def _scan(self, piece: str, info: Token | None = None) -> str:
        """Give a token's text to the stop scanner (its logprobs held with it); what may be passed on now. A piece
        may begin with text the detokenizer held back for earlier tokens (bytes of an unfinished character): the
        token's own text starts where its piece ends with it, so a stop string on it does not report them as it."""
        if info is not None:
            own = len(info.text) if info.text and piece.endswith(info.text) else len(piece)
            self.held.append((self.scanned + len(piece) - own, info))
        self.scanned += len(piece)
        return self.scanner.feed(piece)

    def _pass_on(self, text: str, final: bool = False) -> None:
        """Emit `text`, the next characters the scanner let through, each token's part with its logprobs: a token
        is reported once its text starts to be passed on, never when a stop string swallowed all of it (as
        OpenAI: text rebuilt from the logprobs is the reply). `final`: the reply ends here without a stop string,
        so tokens of no text at its end are reported too."""
        start = at = self.passed
        end = self.passed = start + len(text)
        events = []
        while self.held and (self.held[0][0] < end or final):
            begin, info = self.held.popleft()
            if begin > at:  # the rest of a token reported earlier
                events.append(Event(self.req.index, text[at - start:begin - start]))
            at = max(begin, min(self.held[0][0], end) if self.held else end)
            events.append(Event(self.req.index, text[begin - start:at - start], info))
        if at < end:
            if events:
                events[-1].text += text[at - start:]
            else:
                events.append(Event(self.req.index, text[at - start:]))
        for event in events:
            self._emit(event)

    def end(self, reason: str) -> bool:
        """Finish now with `reason`, what its text holds back passed on (a token mask that cannot go on)."""
        return self._finish(reason, self._scan(self.text.flush()))

    def _emit(self, event: Event) -> None:
        if event.text or event.token or event.finish_reason:
            self.req.emit(event)

    def _finish(self, reason: str, text: str) -> bool:
        if not self.scanner.stopped:  # the end: a held-back tail that never became a stop string is text
            text += self.scanner.flush()
        elif reason == "length":
            reason = "stop"  # the last token completed a stop string
        self._pass_on(text, final=not self.scanner.stopped)
        if not self.req.cancelled.is_set():
            self.req.emit(Event(self.req.index, finish_reason=reason, prompt_tokens=len(self.req.ids),
                                completion_tokens=self.n, cached_tokens=self.cached))
        return True


def generating(models: dict[str, Served], req: Request) -> Served:
    """The served model a generation request names, or a ValueError that says why it cannot generate."""
    served = req.served if req.served is not None else models.get(req.model)
    if served is None:
        raise ValueError(f"the model {req.model!r} is not served (any more)")
    if served.task != "sft":
        raise ValueError(f"{req.model!r} is a {served.task} run and cannot generate text")
    if not req.ids:
        raise ValueError("the prompt has no tokens to continue from")
    return served


class Engine:
    """Generates for several model names that may share one loaded base model (see `Served`), with `decoder`
    computing the logits (default: a TorchDecoder whose prefix cache holds `prefix_cache_mb`)."""

    def __init__(self, models: dict[str, Served], tokenizer, *, decoder: Decoder | None = None,
                 context_window: int | None = None, chat_template: str | None = None, max_batch: int = MAX_BATCH,
                 max_queue: int = 64, batch_wait_s: float = 0.005, device: str | None = None,
                 prefix_cache_mb: float = DEFAULT_MB, prefill_chunk: int = PREFILL_CHUNK):
        from .device import place

        self.models, self.tokenizer, self.chat_template = models, tokenizer, chat_template
        self.decoder = decoder if decoder is not None else TorchDecoder(tokenizer, prefix_cache_mb=prefix_cache_mb)
        if device is not None:  # None: the models stay where they are
            for served in models.values():
                served.module = place(served.module, device)
        first = next(iter(models.values())).module
        self.context_window = context_window or getattr(getattr(first, "config", None), "max_position_embeddings",
                                                        None) or 2048
        self.max_batch, self.max_queue, self.batch_wait_s = max(max_batch, 1), max_queue, batch_wait_s
        self.prefill_chunk = max(prefill_chunk, 1)
        self._waiting: deque[Request] = deque()  # submitted, not yet admitted: at most max_queue (0 = no bound)
        self._changed = threading.Condition()  # guards _waiting and _stopping
        self._stopping = False
        self._worker: threading.Thread | None = None
        self.rows: list[Row] = []  # admitted, reading their prompt or decoding; only the engine's thread changes it
        self._admitting: Request | None = None  # between the waiting list and the rows
        self.threaded = True  # False: the caller drives step() itself (the Python API), no worker thread

    @classmethod
    def for_model(cls, model, tokenizer, **options) -> Engine:
        """An engine over one model as the caller left it (active adapter included), for the Python API."""
        engine = cls({"model": Served(model, as_is=True)}, tokenizer, max_queue=0, **options)
        engine.threaded = False
        return engine

    @property
    def backend(self) -> str:
        """Which decoder computes the logits (`tunesmith serve --backend`)."""
        return self.decoder.name

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
        return {"running": len(self.rows) + (self._admitting is not None), "queued": len(self._waiting)}

    def in_flight(self, model: str) -> int:
        """Requests for the model name `model` still waiting or running (its weights are still needed)."""
        with self._changed:
            requests = [*self._waiting, self._admitting, *(row.req for row in list(self.rows))]
        return sum(req is not None and req.model == model for req in requests)

    def vocabulary(self, model: str | Served) -> tuple[int, set[int]]:
        """(the logits' width, the stop token ids) of a served model (or its name): what a token mask is built for."""
        return self.decoder.vocabulary(self.models[model] if isinstance(model, str) else model)

    @property
    def running(self) -> int:
        return self.stats()["running"]

    @property
    def busy(self) -> bool:
        return bool(self.rows or self._waiting)

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
        for req in waiting:
            fail(req, "the server is shutting down")
        self._abort("the server is shutting down")

    def _loop(self) -> None:
        while True:
            with self._changed:
                idle = not self.rows
                while not self._waiting and not self.rows and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
            if idle and self.max_batch > 1:
                time.sleep(self.batch_wait_s)  # let requests sent together arrive together
            try:
                self.step()
            except Exception as err:  # a bug must not take the worker down: fail what runs, keep serving
                self._abort(f"{type(err).__name__}: {err}")

    def _abort(self, error: str) -> None:
        """Fail every running row, their KV dropped."""
        rows, self.rows = self.rows, []
        for row in rows:
            fail(row.req, error)
            if not row.ended:
                row.ended = True
                try:
                    self.decoder.release(row, keep=False)
                except Exception:  # the decoder's state is what failed: nothing more to free here
                    pass

    # -- scheduling -----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit what fits, feed the prompts being read their next piece, then one decode step of every decoding
        row. True while anything runs or waits.

        The worker thread calls this; the Python API calls it in its own thread on an engine it never started."""
        import torch

        with torch.inference_mode():
            self._admit()
            self._sweep()
            for rows in self._batches(prefilling=True):
                self._prefill(rows)
            self._sweep()
            for rows in self._batches(prefilling=False):
                self._decode(rows)
            self._sweep()
        return self.busy

    def _admit(self) -> None:
        """Start the oldest waiting requests while rows and the decoder's room allow."""
        while len(self.rows) < self.max_batch:
            with self._changed:
                if not self._waiting:
                    return
                req = self._waiting[0]
                if not req.cancelled.is_set() and not self._fits(req):
                    return  # it waits for room, and so does everyone behind it
                self._admitting = self._waiting.popleft()
            try:
                if not req.cancelled.is_set():
                    self._start(req)
            finally:
                self._admitting = None

    def _fits(self, req: Request) -> bool:
        served = req.served if req.served is not None else self.models.get(req.model)
        if served is None or served.task != "sft" or not req.ids or _usage_only(req):
            return True  # answered at once (an error, or the prompt's usage)
        return self.decoder.fits(served, len(req.ids), req.params.max_new_tokens)

    def _start(self, req: Request) -> None:
        """Check a request and give it a row, placed by the decoder; or answer it at once."""
        try:
            served = generating(self.models, req)
            if _usage_only(req):
                req.emit(Event(req.index, finish_reason="length", prompt_tokens=len(req.ids)))
                return
            row = Row(req, served, self.tokenizer, *self.decoder.vocabulary(served))
            self.decoder.start(row)
        except Exception as err:  # this request alone: e.g. a logit_bias outside the vocabulary
            fail(req, f"{type(err).__name__}: {err}")
            return
        self.rows.append(row)

    def _batches(self, *, prefilling: bool) -> list[list[Row]]:
        """The rows reading their prompt (or decoding), in lists that share a forward pass, oldest first."""
        batches: dict[object, list[Row]] = {}
        for row in self.rows:
            if row.prefilling == prefilling:
                batches.setdefault(row.key, []).append(row)
        return list(batches.values())

    def _sweep(self) -> None:
        """Cancelled rows leave without a word; ended rows leave the list."""
        for row in self.rows:
            if row.req.cancelled.is_set():
                self._end(row)
        self.rows = [row for row in self.rows if not row.ended]

    def _end(self, row: Row, keep: bool = True) -> None:
        """The row leaves: its place in the decoder is given back, its KV kept as a cached prefix if `keep`. If
        keeping it fails, it is dropped: a row left behind in the decoder would be batched with the next ones."""
        if row.ended:
            return
        row.ended = True
        try:
            self.decoder.release(row, keep)
        except Exception as err:
            if not keep:
                raise
            log.warning("%r: its prefix was not cached (%s: %s)", row.req, type(err).__name__, err)
            self.decoder.release(row, keep=False)

    def _fail(self, rows: list[Row], err: Exception) -> None:
        """A forward pass failed: its rows fail, their KV dropped; other rows go on."""
        for row in rows:
            fail(row.req, f"{type(err).__name__}: {err}")
            self._end(row, keep=False)

    def _prefill(self, rows: list[Row]) -> None:
        try:
            logits = self.decoder.prefill(rows, self.prefill_chunk)
        except Exception as err:
            self._fail(rows, err)
            return
        ready, last = [], []
        for row, out in zip(rows, logits):
            if row.scoring and not self._score_piece(row, out):
                continue
            if row.prefilling or (row.scoring and not self._score(row)):
                continue
            ready.append(row)
            last.append(out[-1].float().cpu() if row.scoring else out)
        self._advance(ready, last)

    def _score_piece(self, row: Row, logits) -> bool:
        """Score the prompt piece just read (logits [n, V] of its positions), keeping only its logprobs; False
        when that failed (the row has ended)."""
        try:
            start = row.fed - logits.shape[0]
            row.scores += prompt_logprobs(logits, row.req.ids, row.req.params.prompt_logprobs, self.tokenizer, start)
        except Exception as err:
            fail(row.req, f"{type(err).__name__}: {err}")
            self._end(row)
            return False
        return True

    def _score(self, row: Row) -> bool:
        """Emit a row's prompt logprobs (echo + logprobs), before its reply's first token, once its whole prompt
        is scored; False when the row ends here (max_tokens 0, or failed)."""
        req = row.req
        try:
            scores, row.scores = row.scores, []
            req.emit(Event(req.index, prompt=scores))
            if req.params.max_new_tokens == 0:  # scored, nothing to generate
                req.emit(Event(req.index, finish_reason="length", prompt_tokens=len(req.ids)))
                self._end(row)
                return False
        except Exception as err:
            fail(req, f"{type(err).__name__}: {err}")
            self._end(row)
            return False
        return True

    def _decode(self, rows: list[Row]) -> None:
        try:
            logits = self.decoder.step(rows)
        except Exception as err:
            self._fail(rows, err)
            return
        self._advance(rows, logits)

    def _advance(self, rows: list[Row], logits) -> None:
        """Each row picks and records its token from its logits [V]; rows that finish leave."""
        for row, out in zip(rows, logits):
            if row.req.cancelled.is_set():
                self._end(row)  # the client went away: drop the row without a word
                continue
            try:
                finished = row.advance(*row.pick(out))
            except ConstraintFailed as err:  # its grammar cannot go on: the reply ends here, saying so
                log.warning("%r ends with finish_reason grammar_error: %s", row.req, err)
                finished = row.end("grammar_error")
            except Exception as err:  # this row's settings or callback: it fails alone
                fail(row.req, f"{type(err).__name__}: {err}")
                finished = True
            if finished or row.req.cancelled.is_set():  # cancelled from its own callback: gone now
                self._end(row)


def _usage_only(req: Request) -> bool:
    """max_tokens 0 without prompt logprobs: the answer is the prompt's usage, nothing to compute."""
    return req.params.max_new_tokens == 0 and req.params.prompt_logprobs is None

"""The batching generator behind the server: one worker thread takes every waiting request for the same
model (up to `max_batch`), prefills them together left-padded, then decodes one token per forward pass over
the batch with the KV cache. Sampling settings, stop tokens/strings and cancellation are per row, so a
finished or abandoned row leaves the batch at once while the others continue.

Requests wait in one bounded list until the worker takes them into a batch: at most `max_queue` wait at any
time (`QueueFull` beyond). Results come back as `Event`s through each request's `emit` callback, called on
the worker thread. A row whose sampling fails gets an error event and leaves the batch; the others go on."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from ..generate import _StopScanner
from ..batching import device_of, pad
from ..data.tokenize import stop_token_ids


class QueueFull(Exception):
    """The request queue is full: the server answers 429."""


# Below this temperature sampling means argmax, as in vLLM (_SAMPLING_EPS): logits / 1e-45 overflow float32 to
# inf and softmax turns them into NaN, which torch.multinomial rejects.
GREEDY_BELOW = 1e-5


@dataclass
class Served:
    """One servable model name: a model object, plus the peft adapter to activate on it (None = the base)."""

    module: object
    adapter: str | None = None
    task: str = "sft"  # "sft" generates text; "classify"/"ner" runs are listed but do not generate
    use_cache: bool = True  # prompt-learning adapters re-run the full sequence (peft prepends virtual tokens)
    run: str | None = None

    def activate(self):
        """Context in which `module` behaves as this name: its adapter active, or every adapter disabled."""
        if self.adapter is not None:
            self.module.set_adapter(self.adapter)
            return nullcontext()
        if hasattr(self.module, "disable_adapter") and hasattr(self.module, "peft_config"):
            return self.module.disable_adapter()
        return nullcontext()


@dataclass
class Token:
    """One generated token for logprobs: its text, bytes, logprob and the top alternatives."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Event:
    index: int = 0  # which of a request's n choices
    text: str = ""  # new text, already cut at stop strings
    token: Token | None = None
    finish_reason: str | None = None  # set on the last event of a choice: "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    model: str
    ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # number of top alternatives per token; None = no logprobs
    index: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)


def _fail(req: Request, error: str) -> None:
    """End `req` with an error event; a callback that fails too is ignored (its client is gone)."""
    try:
        req.emit(Event(req.index, error=error))
    except Exception:
        pass


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, req: Request, tokenizer, vocab: int):
        import torch

        self.req, self.tokenizer = req, tokenizer
        seed = req.seed % 2**63 if req.seed is not None else int(torch.randint(0, 2**62, ()))
        self.generator = torch.Generator().manual_seed(seed)  # per row: a seeded reply ignores its batch-mates
        self.counts = torch.zeros(vocab) if (req.presence_penalty or req.frequency_penalty) else None
        self.tokens: list[int] = []  # generated, without the stop token
        self.decoded = ""
        self.scanner = _StopScanner(req.stop)
        self.n = 0  # completion tokens, the stop token included

    def pick(self, logits):
        """Penalise, take logprobs, then sample (or argmax when temperature is 0). logits: [V] float."""
        import torch

        req = self.req
        if self.counts is not None:  # OpenAI's definition: mu - count * freq - (count > 0) * presence
            logits = logits - self.counts * req.frequency_penalty - (self.counts > 0).float() * req.presence_penalty
        if req.temperature < GREEDY_BELOW:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / req.temperature, -1)
            if req.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p >= req.top_p  # keep the smallest set reaching top_p
                drop[0] = False  # a top_p below float32's resolution (1e-300 rounds to 0) keeps the top token
                probs = probs.clone()
                probs[order[drop]] = 0
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        info = None
        if req.logprobs is not None:
            logp = torch.log_softmax(logits, -1)
            top = logp.topk(req.logprobs) if req.logprobs else None
            alternatives = [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(*top)] if top else []
            info = Token(self.tokenizer.decode([token]), float(logp[token]), alternatives)
        if self.counts is not None:
            self.counts[token] += 1
        return token, info

    def advance(self, token: int, info: Token | None, stops: set[int]) -> bool:
        """Record a token and emit what it adds; True when this row has finished."""
        req = self.req
        self.n += 1
        if token in stops:
            return self._finish("stop", info)
        self.tokens.append(token)
        out = self._feed(final=False)
        if self.scanner.stopped:
            return self._finish("stop", info, out)
        if self.n >= req.max_tokens:
            return self._finish("length", info, out)
        req.emit(Event(req.index, out, info))
        return False

    def _feed(self, final: bool) -> str:
        """New text since the last call, through the stop-string scanner."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # hold back a partial UTF-8 character until it completes
            return ""
        piece, self.decoded = text[len(self.decoded):], text
        return self.scanner.feed(piece) if piece else ""

    def _finish(self, reason: str, info: Token | None, text: str = "") -> bool:
        if not self.scanner.stopped:  # the end: release what was held back (a partial character, a stop prefix)
            text += self._feed(final=True)
            if self.scanner.stopped:
                reason = "stop"
            else:
                text += self.scanner.flush()
        self.req.emit(Event(self.req.index, text, info, reason, len(self.req.ids), self.n))
        return True


class Engine:
    """Serves generation for several model names that may share one loaded base model."""

    def __init__(self, models: dict[str, Served], tokenizer, *, context_window: int, chat_template: str | None = None,
                 max_batch: int = 8, max_queue: int = 64, batch_wait_s: float = 0.005):
        self.models, self.tokenizer = models, tokenizer
        self.context_window, self.chat_template = context_window, chat_template
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        self.stops = stop_token_ids(tokenizer, getattr(next(iter(models.values())).module, "generation_config", None))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stops, default=0)
        self._waiting: deque[Request] = deque()  # submitted, not yet in a batch: at most max_queue (0 = no bound)
        self._changed = threading.Condition()  # guards _waiting and _stopping
        self._stopping = False
        self._worker: threading.Thread | None = None
        self.running = 0  # rows in the batch being decoded now (reported by /health)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._stopping = False
            self._worker = threading.Thread(target=self._loop, name="tunesmith-engine", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        """Finish the batch being decoded, fail the requests still waiting, and end the worker."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._worker is not None and self._worker.is_alive():
            self._worker.join(timeout=30)
        self._worker = None
        with self._changed:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            _fail(req, "the server is shutting down")

    def stats(self) -> dict:
        return {"running": self.running, "queued": len(self._waiting)}

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all n choices of one API call), all or none; QueueFull if there is no room for all."""
        self.start()
        with self._changed:
            if any(r.cancelled.is_set() for r in self._waiting):  # abandoned while waiting: free their places
                self._waiting = deque(r for r in self._waiting if not r.cancelled.is_set())
            if self.max_queue and len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull
            self._waiting.extend(requests)
            self._changed.notify()

    # -- worker ---------------------------------------------------------------------------------------------
    def _next_batch(self) -> list[Request] | None:
        """Up to max_batch waiting requests for the model of the oldest one; None once stopped."""
        while True:
            with self._changed:
                while not self._waiting and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return None
            if self.max_batch > 1:
                time.sleep(self.batch_wait_s)  # let requests sent together arrive together
            with self._changed:
                if not self._waiting:  # all cancelled (and purged by submit) while we slept
                    continue
                model = self._waiting[0].model
                batch = [r for r in self._waiting if r.model == model][: self.max_batch]
                for r in batch:
                    self._waiting.remove(r)
                return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            try:
                self.running = len(batch)
                self._run(batch)
            except Exception as err:  # a bug must not take the worker down: fail this batch, keep serving
                for req in batch:
                    _fail(req, f"{type(err).__name__}: {err}")
            finally:
                self.running = 0

    def _run(self, batch: list[Request]) -> None:
        import torch
        from transformers import DynamicCache

        served = self.models[batch[0].model]
        model = served.module
        vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else None
        rows = [_Row(r, self.tokenizer, vocab) for r in batch]
        device = device_of(model)
        # Left padding: every prompt ends at the same column, so each step appends one column for all rows.
        ids, mask = pad([r.ids for r in batch], self.pad, side="left", device=device)  # [B, T] each
        cache = DynamicCache() if served.use_cache else None
        step_ids = ids
        with torch.inference_mode(), served.activate():
            while True:
                kwargs = {"attention_mask": mask, "logits_to_keep": 1}
                if served.use_cache:
                    positions = mask.cumsum(-1) - 1  # padding does not advance positions, as in generate()
                    kwargs.update(past_key_values=cache, use_cache=True,
                                  position_ids=positions.clamp(min=0)[:, -step_ids.shape[1]:])
                else:
                    kwargs["use_cache"] = False
                # Rows sample on the CPU with their own seeded generators: one small copy per step.
                logits = model(input_ids=step_ids, **kwargs).logits[:, -1, :].float().cpu()  # [B, V]
                keep, new = [], []
                for i, row in enumerate(rows):
                    if row.req.cancelled.is_set():
                        continue  # the client went away: drop the row without a word
                    try:
                        token, info = row.pick(logits[i])
                        finished = row.advance(token, info, self.stops)
                    except Exception as err:  # this row's settings or callback: it fails alone
                        _fail(row.req, f"{type(err).__name__}: {err}")
                        continue
                    if not finished:
                        keep.append(i)
                        new.append(token)
                self.running = len(keep)
                if not keep:
                    return
                if len(keep) < len(rows):  # shrink the batch: finished rows cost nothing from now on
                    index = torch.tensor(keep, device=device)
                    rows = [rows[i] for i in keep]
                    mask, ids = mask[index], ids[index]
                    if cache is not None:
                        cache.batch_select_indices(index)
                column = torch.tensor(new, device=device)[:, None]  # [B', 1]
                mask = torch.cat([mask, torch.ones_like(column)], -1)
                ids = torch.cat([ids, column], -1)
                step_ids = column if served.use_cache else ids

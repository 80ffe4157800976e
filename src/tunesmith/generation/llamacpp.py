"""The engine on llama.cpp (`tunesmith serve --backend llama-cpp`): llama.cpp computes the logits of a GGUF model,
and tunesmith's own `Row`s pick the tokens (sampler, stop strings, token masks, logprobs), so a seed, a
temperature, a stop string or a response_format means the same thing on both backends.

Continuous batching as llama-server does it: each running request holds one sequence id of a shared KV cache;
one `llama_decode` takes every running row's last token together with the prompts admitted at this step, and a
request that ends (finished, failed, or its client gone) gives its cells back at once (`llama_memory_seq_rm`).
The cache is unified (any sequence may use any cell) and holds one context window; a request is admitted only
when its prompt plus max_tokens fits beside what the running rows may still take, so no reply runs out of cache
halfway. Queueing, `submit`, `stats`, cancellation and the worker thread are the torch `Engine`'s own.

Imports llama_cpp (llama-cpp-python, `make setup-fast`) only when a model is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.tokenize import stop_token_ids
from ..errors import TunesmithError
from .engine import Engine, Event, Request, Row, Served, fail, generating
from .sampler import prompt_logprobs

N_BATCH = 512  # tokens per llama_decode call (longer prompts go in pieces): bounds the logits buffer


class LlamaCppError(TunesmithError, RuntimeError):
    """llama.cpp cannot load a file or decode a batch."""


def import_llama_cpp():
    """The llama_cpp module, initialised once, its log quiet but for errors (llama.cpp prints every tensor on load)."""
    import logging

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # what llama_cpp's log callback prints
    if not getattr(import_llama_cpp, "initialised", False):
        llama_cpp.llama_backend_init()
        import_llama_cpp.initialised = True
    return llama_cpp


class GGUFModel:
    """One GGUF file loaded by llama.cpp, with a decoding context of `max_batch` sequences over a unified KV cache
    of `context_window` cells (llama.cpp rounds it up to a multiple of 256)."""

    def __init__(self, path: str | Path, tokenizer, *, max_batch: int = 8, context_window: int | None = None,
                 threads: int | None = None, generation_config=None):
        import numpy as np

        lib = self.lib = import_llama_cpp()
        self.path, self._np = Path(path), np
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise LlamaCppError(f"llama.cpp cannot load {path}: is it a GGUF file of an architecture it knows?")
        vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(vocab)
        self.window = context_window or lib.llama_model_n_ctx_train(self.model)
        # The ids the torch engine stops at (the tokenizer's EOS, the generation config's), and the file's EOS. Not
        # llama.cpp's end-of-generation set: it guesses more by their text (<|eot_id|>, <|endoftext|>, ...).
        self.stops = stop_token_ids(tokenizer, generation_config) | {t for t in [lib.llama_vocab_eos(vocab)] if t >= 0}
        params = lib.llama_context_default_params()
        params.n_ctx = self.window
        params.n_batch = params.n_ubatch = min(N_BATCH, self.window)
        params.n_seq_max = max(max_batch, 1)
        params.kv_unified = True  # one pool of cells for every sequence, instead of window / max_batch each
        params.n_outputs_max_per_seq = 0  # prompt logprobs want every position of one sequence
        self.threads = threads or len(os.sched_getaffinity(0))
        params.n_threads = params.n_threads_batch = self.threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LlamaCppError(f"llama.cpp cannot make a {self.window}-token context for {path}")
        self.memory = lib.llama_get_memory(self.ctx)
        self.cells = lib.llama_n_ctx(self.ctx)
        self.n_batch = lib.llama_n_batch(self.ctx)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.n_seq_max = params.n_seq_max
        self.free_seqs = list(range(self.n_seq_max))
        self.reserved = 0  # cells the running sequences may take (prompt + max_tokens each)

    def forward(self, tokens: list[int], positions: list[int], seqs: list[int], outputs: list[bool]):
        """Feed tokens (of any sequences, in n_batch pieces) into the KV cache; the logits of those marked in
        `outputs`, in order, as float32 [n_outputs, n_vocab]."""
        import torch

        lib, np, batch = self.lib, self._np, self.batch
        logits = np.empty((sum(outputs), self.n_vocab), dtype=np.float32)
        k = 0
        for start in range(0, len(tokens), self.n_batch):
            end = min(start + self.n_batch, len(tokens))
            marked = []
            for j, i in enumerate(range(start, end)):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tokens[i], positions[i], 1
                batch.seq_id[j][0], batch.logits[j] = seqs[i], outputs[i]
                if outputs[i]:
                    marked.append(j)
            batch.n_tokens = end - start
            if (code := lib.llama_decode(self.ctx, batch)) != 0:
                raise LlamaCppError(f"llama_decode returned {code}"
                                    + (" (no room in the KV cache)" if code == 1 else ""))
            for j in marked:  # copied now: the next decode overwrites llama.cpp's logits buffer
                logits[k] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,))
                k += 1
        return torch.from_numpy(logits)

    def take(self, cells: int) -> int:
        """A free sequence id, with `cells` of the cache reserved for it."""
        seq = self.free_seqs.pop()
        self.reserved += cells
        return seq

    def release(self, seq: int, cells: int) -> None:
        """Drop a sequence's cells from the cache and give its id back."""
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free_seqs.append(seq)
        self.reserved -= cells

    def fits(self, cells: int) -> bool:
        return self.reserved + cells <= self.cells

    def reset(self) -> None:
        """Empty the cache: every sequence id free again."""
        self.lib.llama_memory_clear(self.memory, True)
        self.free_seqs, self.reserved = list(range(self.n_seq_max)), 0

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except TypeError:  # at interpreter exit llama_cpp's functions may already be gone (None)
            pass


class Slot(Row):
    """A Row with its place in llama.cpp's KV cache: a sequence id, the cells it holds, the cells it reserved."""

    def __init__(self, req: Request, model: GGUFModel, tokenizer):
        super().__init__(req, None, tokenizer, model.n_vocab, model.stops)
        self.model, self.cells = model, len(req.ids) + req.params.max_new_tokens
        self.seq = model.take(self.cells)
        self.pos = 0  # positions already in the cache
        self.fresh = True  # its prompt is fed at the next step

    @property
    def scoring(self) -> bool:
        """Its prompt is fed at this step with the logits of every position kept (echo + logprobs)."""
        return self.fresh and self.req.params.prompt_logprobs is not None

    def release(self) -> None:
        if self.seq is not None:
            self.model.release(self.seq, self.cells)
            self.seq = None


@dataclass
class Group:
    """The running rows of one GGUF model (the engine's `_groups` holds one per model)."""

    model: GGUFModel
    rows: list[Slot] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


class LlamaCppEngine(Engine):
    """An `Engine` whose served modules are `GGUFModel`s; the same interface for the server and the Python API."""

    backend = "llama-cpp"

    def __init__(self, models: dict[str, Served], tokenizer, *, context_window: int, gguf_quant: str | None = None,
                 **options):
        super().__init__(models, tokenizer, context_window=context_window, **options)
        self.gguf_quant = gguf_quant  # the type a run loaded while serving is exported at (None: the default)

    def vocabulary(self, name: str) -> tuple[int, set[int]]:
        model = self.models[name].module
        return model.n_vocab, set(model.stops)

    def _admit(self) -> list[Request]:
        """The oldest waiting requests that fit beside the running rows, in rows and in KV-cache cells. A request
        that does not fit yet waits, and so do those behind it (first come, first served)."""
        room = self.max_batch - sum(map(len, self._groups.values()))
        pending: dict[int, int] = {}
        with self._changed:
            taken = []
            while self._waiting and len(taken) < room:
                req = self._waiting[0]
                served = self.models.get(req.model)
                model = served.module if served is not None else None
                if not req.cancelled.is_set() and isinstance(model, GGUFModel):
                    need = len(req.ids) + req.params.max_new_tokens
                    if need <= model.cells and not model.fits(pending.get(id(model), 0) + need):
                        break
                    pending[id(model)] = pending.get(id(model), 0) + need
                self._waiting.popleft()
                if not req.cancelled.is_set():
                    taken.append(req)
            return taken

    def step(self) -> bool:
        """Admit what fits, then one llama_decode per model: the running rows' next tokens and the new prompts."""
        import torch

        with torch.inference_mode():
            admitted = self._admit()
            self._admitting = admitted
            try:
                for req in admitted:
                    self._start(req)
            finally:
                self._admitting = []
            for key in list(self._groups):
                self._decode(key)
            self._running = sum(map(len, self._groups.values()))
        return self.busy

    def _start(self, req: Request) -> None:
        """Check a newly admitted request and give it a slot in its model's group (prefilled at the next decode)."""
        try:
            model = generating(self.models, req).module
            need = len(req.ids) + req.params.max_new_tokens
            if need > model.cells:
                raise ValueError(f"the prompt and max_tokens need {need} tokens of KV cache; this model has "
                                 f"{model.cells}")
            if req.params.max_new_tokens == 0 and req.params.prompt_logprobs is None:  # the prompt's usage only
                req.emit(Event(req.index, finish_reason="length", prompt_tokens=len(req.ids)))
                return
            if id(model) not in self._groups and len(model.free_seqs) < model.n_seq_max:
                model.reset()  # none of its rows runs: cells a failed step left behind are free again
            slot = Slot(req, model, self.tokenizer)
        except Exception as err:  # this request alone: e.g. a logit_bias outside the vocabulary
            fail(req, f"{type(err).__name__}: {err}")
            return
        self._groups.setdefault(id(model), Group(model)).rows.append(slot)

    def _decode(self, key) -> None:
        group = self._groups[key]
        for row in group.rows:
            if row.req.cancelled.is_set():
                row.release()
        rows = [row for row in group.rows if row.seq is not None]
        tokens, positions, seqs, outputs = [], [], [], []
        for row in rows:
            fed = row.req.ids if row.fresh else [row.last]
            tokens += fed
            positions += range(row.pos, row.pos + len(fed))
            seqs += [row.seq] * len(fed)
            outputs += [row.scoring] * (len(fed) - 1) + [True]
        try:
            logits = group.model.forward(tokens, positions, seqs, outputs) if rows else None
        except Exception as err:  # the forward pass: this model's rows fail, other models go on
            for row in rows:
                fail(row.req, f"{type(err).__name__}: {err}")
                row.release()
            del self._groups[key]
            return
        last, at, done = [], 0, set()
        for i, row in enumerate(rows):
            n = len(row.req.ids) if row.scoring else 1
            if row.scoring and not self._scored(row, logits[at:at + n]):
                done.add(i)
            row.pos += len(row.req.ids) if row.fresh else 1
            row.fresh = False
            at += n
            last.append(at - 1)
        keep = set(self._pick(rows, logits[last], skip=done)) if rows else set()
        for i, row in enumerate(rows):
            if i not in keep:
                row.release()
        group.rows = [row for i, row in enumerate(rows) if i in keep]
        if not group.rows:
            del self._groups[key]

    def _scored(self, row: Slot, logits) -> bool:
        """Emit a row's prompt logprobs (echo + logprobs) from its logits [T, V]; False when the row ends here."""
        req = row.req
        try:
            req.emit(Event(req.index, prompt=prompt_logprobs(logits, req.ids, req.params.prompt_logprobs,
                                                             self.tokenizer)))
            if req.params.max_new_tokens == 0:  # scored, nothing to generate
                req.emit(Event(req.index, finish_reason="length", prompt_tokens=len(req.ids)))
                return False
        except Exception as err:
            fail(req, f"{type(err).__name__}: {err}")
            return False
        return True

    def stop(self) -> None:
        models = {id(g.model): g.model for g in self._groups.values()}
        super().stop()
        for model in models.values():
            model.reset()

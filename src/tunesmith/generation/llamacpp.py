"""The llama.cpp decoder (`tunesmith serve --backend llama-cpp`): llama.cpp computes the logits of a GGUF model,
and the engine's own rows pick the tokens (sampler, stop strings, token masks, logprobs), so a seed, a
temperature, a stop string or a response_format means the same thing on both backends. Queueing, admission,
scoring and events are the one `Engine`'s; `LlamaCppDecoder` is what the engine asks of llama.cpp (decoder.py).

Continuous batching as llama-server does it: each running request holds one sequence id of a shared KV cache,
one `llama_decode` takes the tokens of many sequences, and a request that ends gives its sequence back. The
cache is unified (any sequence may use any cell) and holds one context window; a request is admitted only when
its prompt plus max_tokens fits beside what the running rows may still take, so no reply runs out of cache
halfway.

Prefix reuse: a finished request's sequence (and a prompt, once read) is copied out of the KV cache into host
memory (`llama_state_seq_get_data`) as a cached prefix, and its cells are emptied; a new request that begins with
its tokens has it written back into its own sequence (`llama_state_seq_set_data`, then cut to the shared part) and
reads only the rest of its prompt. Kept in the pool instead, cached prefixes made every later decode slower:
llama.cpp's attention spans every used cell of a unified cache, so a batch-1 decode of the 135M model ran at
0.82-0.85x llama-server's once earlier conversations sat in the pool, 0.96x with none (docs/benchmarks.md);
llama-server likewise saves idle slots to host memory and clears them (`--cache-ram`). Least recently used out
first beyond `--prefix-cache-mb`. Each GGUF file is its own model and context, so KV is never shared across
adapters. Models with a sliding-window or recurrent cache keep no prefixes (their cells cannot be cut by position
range).

Imports llama_cpp (llama-cpp-python, `make setup-fast`) only when a model is loaded."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.tokenize import stop_token_ids
from ..errors import TunesmithError
from .engine import MAX_BATCH
from .prefix_cache import DEFAULT_MB, PrefixCache

MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids per context
N_BATCH = 512  # tokens per llama_decode call (longer prompts go in pieces): bounds the logits buffer
# Batch invariance (`batch_invariant`): a row's logits the same bit for bit whatever else shares its llama_decode
# call, so a greedy reply does not depend on the load. llama.cpp's CPU kernels are chosen by the shape of a call:
# a matmul over 1 token or 1 output takes another path than over 2 or more (llamafile's sgemm: the embedded
# model's Q8_0 output layer), and flash attention splits the cache between threads for a single token but tiles
# it in blocks of 64 cells (a sequence's cells sit anywhere in the shared cache) for 64 tokens or more; only in
# between does each token attend on its own, over its own cells in order. So each call then holds at most
# CALL_TOKENS tokens and at least MIN_TOKENS tokens and outputs, a lone one made up by a scratch token (on a
# sequence of its own, emptied after the call). Measured (docs/backends.md): 0 of 16 greedy replies of the
# embedded model change beside 15 others (10 of 16 without), for ~40% slower decoding of a lone request. Not
# covered: repacked weights (Q4_0 and K-quants on AVX2 multiply rows in fours, the rest one by one).
CALL_TOKENS = 56  # tokens per call: below flash attention's 64-token tiles
MIN_TOKENS = 2


def _scratch(tokens: int, outputs: int) -> list[bool]:
    """The scratch tokens an invariant call of `tokens` tokens (`outputs` of them outputs) needs, each True when
    its logits are computed: enough for MIN_TOKENS tokens and MIN_TOKENS outputs."""
    logits = max(MIN_TOKENS - outputs, 0)
    return [True] * logits + [False] * max(MIN_TOKENS - tokens - logits, 0)


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
    """One GGUF file loaded by llama.cpp, with a decoding context over a unified KV cache of `context_window` cells
    (llama.cpp rounds it up to a multiple of 256): `max_batch` sequences for running rows (cached prefixes live in
    host memory, not in sequences)."""

    def __init__(self, path: str | Path, tokenizer, *, max_batch: int = MAX_BATCH, context_window: int | None = None,
                 threads: int | None = None, generation_config=None, batch_invariant: bool = False):
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
        self.batch_invariant = batch_invariant
        self.call_tokens = CALL_TOKENS if batch_invariant else min(N_BATCH, self.window)
        params.n_batch = params.n_ubatch = self.call_tokens + MIN_TOKENS  # a call's tokens and scratch tokens
        usable = min(max(max_batch, 1), MAX_SEQ - 1)
        params.n_seq_max = usable + 1  # and the scratch sequence (see `forward`)
        params.kv_unified = True  # one pool of cells for every sequence, instead of window / max_batch each
        params.n_outputs_max_per_seq = 0  # prompt logprobs want every position of one sequence
        self.threads = threads or len(os.sched_getaffinity(0))
        params.n_threads = params.n_threads_batch = self.threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LlamaCppError(f"llama.cpp cannot make a {self.window}-token context for {path}")
        self.memory = lib.llama_get_memory(self.ctx)
        self.cells = lib.llama_n_ctx(self.ctx) - 1  # one cell kept for the scratch token
        self.n_batch = lib.llama_n_batch(self.ctx)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.n_seq_max, self.scratch = usable, usable
        self.free_seqs = list(range(self.n_seq_max))
        self.reserved = 0  # cells the running sequences may take (prompt + max_tokens each)
        # Cached prefixes: payload a sequence's state as llama_state_seq_get_data writes it (a ctypes buffer in host
        # memory), size its length. The decoder sets the budget; 0 where cells cannot be cut by position range.
        self.prefixes = PrefixCache(0)
        self.pending: dict[int, list[int]] = {}  # sequence -> the prompt to cache at the next forward (remember)
        self.reusable = not (lib.llama_model_is_recurrent(self.model) or lib.llama_model_is_hybrid(self.model)
                             or lib.llama_model_n_swa(self.model) > 0)
        heads = lib.llama_model_n_head(self.model)
        kv_width = lib.llama_model_n_embd(self.model) * lib.llama_model_n_head_kv(self.model) // max(heads, 1)
        self.cell_bytes = lib.llama_model_n_layer(self.model) * 2 * kv_width * 2

    def forward(self, tokens: list[int], positions: list[int], seqs: list[int], outputs: list[bool]):
        """Feed tokens (of any sequences, in calls of `call_tokens`) into the KV cache; the logits of those marked in
        `outputs`, in order, as float32 [n_outputs, n_vocab]."""
        import torch

        self._flush()
        lib, np, batch = self.lib, self._np, self.batch
        logits = np.empty((sum(outputs), self.n_vocab), dtype=np.float32)
        k = 0
        for start in range(0, len(tokens), self.call_tokens):
            end = min(start + self.call_tokens, len(tokens))
            marked = []
            for j, i in enumerate(range(start, end)):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tokens[i], positions[i], 1
                batch.seq_id[j][0], batch.logits[j] = seqs[i], outputs[i]
                if outputs[i]:
                    marked.append(j)
            scratch = _scratch(end - start, len(marked)) if self.batch_invariant else []
            for j, output in enumerate(scratch, start=end - start):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tokens[start], j - (end - start), 1
                batch.seq_id[j][0], batch.logits[j] = self.scratch, output
            batch.n_tokens = end - start + len(scratch)
            try:
                code = lib.llama_decode(self.ctx, batch)
            finally:
                if scratch:
                    lib.llama_memory_seq_rm(self.memory, self.scratch, -1, -1)
            if code != 0:
                raise LlamaCppError(f"llama_decode returned {code}"
                                    + (" (no room in the KV cache)" if code == 1 else ""))
            for j in marked:  # copied now: the next decode overwrites llama.cpp's logits buffer
                logits[k] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,))
                k += 1
        return torch.from_numpy(logits)

    def room(self, cells: int) -> bool:
        """Whether `cells` more fit beside what the running rows may take."""
        return self.reserved + cells <= self.cells

    def take(self, ids: list[int], cells: int, reuse: bool) -> tuple[int, int]:
        """(a free sequence id with `cells` of the cache reserved for it, how many leading tokens of `ids` it
        already holds: those of the longest cached prefix, with `reuse`, leaving the last token to compute)."""
        seq = self.free_seqs.pop()
        self.reserved += cells
        entry, n = self.prefixes.longest(None, ids, len(ids) - 1) if reuse and self.reusable else (None, 0)
        if n and not self._restore(seq, entry.payload, n):
            n = 0
        return seq, n

    def _restore(self, seq: int, state, n: int) -> bool:
        """Write a cached prefix's state into `seq` and keep its first `n` tokens; False (and `seq` empty) when
        llama.cpp finds no room for all of its cells at once."""
        lib = self.lib
        if lib.llama_state_seq_set_data(self.ctx, state, len(state), seq) == 0:
            lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
            return False
        lib.llama_memory_seq_rm(self.memory, seq, n, -1)
        return True

    def _state(self, seq: int):
        """`seq`'s cells (keys, values, positions) as llama_state_seq_get_data writes them, in a ctypes buffer of
        their size (no copy into bytes: a 1,300-token conversation of the 135M model is 28 MB)."""
        lib = self.lib
        size = lib.llama_state_seq_get_size(self.ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(self.ctx, buffer, size, seq)
        return buffer if written == size else (ctypes.c_uint8 * written).from_buffer_copy(buffer)

    def _keep(self, seq: int, ids: list[int]) -> None:
        """Cache the state of `seq`, which holds the KV of exactly `ids`, unless it would add nothing."""
        if ids and self.reusable and not self.prefixes.covers(None, ids) \
                and len(ids) * self.cell_bytes <= self.prefixes.budget:
            state = self._state(seq)
            self.prefixes.put(None, ids, state, len(state))

    def remember(self, seq: int, ids: list[int]) -> None:
        """Cache a running sequence's first len(ids) cells, which are all it holds yet (its prompt, once read):
        at the next `forward`, before it feeds the sequence anything, so that copying them out does not delay
        the first token picked from the prompt's logits."""
        self.pending[seq] = ids

    def _flush(self) -> None:
        pending, self.pending = self.pending, {}
        for seq, ids in pending.items():
            self._keep(seq, ids)

    def release(self, seq: int, cells: int, ids: list[int] | None = None) -> None:
        """Give a sequence id back, its `cells` reservation with it, and empty its cells; with `ids` (the tokens
        its cells hold) their state is cached first."""
        self.reserved -= cells
        self.pending.pop(seq, None)  # what it holds now begins with what it was to remember
        try:
            if ids:
                self._keep(seq, ids)
        finally:
            self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)
            self.free_seqs.append(seq)

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


@dataclass
class Slot:
    """A llama.cpp row's place: its model, its sequence id, and the cells it reserved (prompt + max_tokens)."""

    model: GGUFModel
    seq: int
    cells: int


class LlamaCppDecoder:
    """The engine's decoder for `GGUFModel`s (see decoder.py): rows of one model share each llama_decode.
    `gguf_quant` is the type a run loaded while serving is exported at (None: the default)."""

    name = "llama-cpp"

    def __init__(self, *, prefix_cache_mb: float = DEFAULT_MB, gguf_quant: str | None = None):
        self.prefix_bytes, self.gguf_quant = int(prefix_cache_mb * 2**20), gguf_quant

    def vocabulary(self, served) -> tuple[int, set[int]]:
        return served.module.n_vocab, set(served.module.stops)

    def fits(self, served, prompt_tokens: int, max_tokens: int) -> bool:
        need = prompt_tokens + max_tokens
        return need > served.module.cells or served.module.room(need)  # too big ever: `start` says so

    def start(self, row) -> None:
        model, need = row.served.module, len(row.req.ids) + row.req.params.max_new_tokens
        if need > model.cells:
            raise ValueError(f"the prompt and max_tokens need {need} tokens of KV cache; this model has {model.cells}")
        model.prefixes.budget = self.prefix_bytes
        seq, row.cached = model.take(row.req.ids, need, reuse=not row.scoring)
        row.slot, row.key, row.fed = Slot(model, seq, need), id(model), row.cached

    def prefill(self, rows: list, chunk: int) -> list:
        pieces = [row.req.ids[row.fed:row.fed + chunk] for row in rows]
        logits = self._forward(rows, pieces)
        out, at = [], 0
        for row, piece in zip(rows, pieces):
            n = len(piece) if row.scoring else 1
            out.append(logits[at:at + n] if row.scoring else logits[at])
            at += n
            row.fed += len(piece)
            if not row.prefilling:  # the prompt is in: the next requests that begin with it may share its cells
                row.slot.model.remember(row.slot.seq, row.req.ids)
        return out

    def step(self, rows: list):
        logits = self._forward(rows, [[row.last] for row in rows])
        for row in rows:
            row.fed += 1
        return logits

    def _forward(self, rows: list, pieces: list[list[int]]):
        """llama_decode (in calls of `call_tokens`) of each row's tokens at its next positions; the logits of each
        piece's last token, or of all its tokens for a scoring row still reading its prompt."""
        tokens, positions, seqs, outputs = [], [], [], []
        for row, piece in zip(rows, pieces):
            tokens += piece
            positions += range(row.fed, row.fed + len(piece))
            seqs += [row.slot.seq] * len(piece)
            every = row.scoring and row.prefilling
            outputs += [every] * (len(piece) - 1) + [True]
        return rows[0].slot.model.forward(tokens, positions, seqs, outputs)

    def release(self, row, keep: bool) -> None:
        if row.slot is not None:
            slot, row.slot = row.slot, None
            slot.model.release(slot.seq, slot.cells, row.fed_ids() if keep else None)

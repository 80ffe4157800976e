"""What the engine asks of a backend: `Decoder`, which computes the logits of a set of rows. The engine (engine.py)
is the one scheduler: the waiting list, admission, the rows, sampling, stop strings and events. A decoder only
places rows in its KV cache, feeds them tokens and gives their places back, as nanochat's `Engine` asks of a
model only a forward pass with a cache. Two implement it: `TorchDecoder` (batch.py: transformers models, every
peft adapter type, CPU or CUDA) and `LlamaCppDecoder` (llamacpp.py: GGUF files on llama.cpp); a third backend
would be a third decoder, never a copy of admission or scoring.

A decoder keeps its own state per row in `row.slot` and `row.key` (rows with equal keys run in one forward pass:
the engine calls `prefill` and `step` with the rows of one key), counts the tokens in the row's KV cache in
`row.fed`, and reuses the longest cached prefix of a new prompt (prefix_cache.py), reporting it in `row.cached`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .engine import Row, Served


class Decoder(Protocol):
    name: str  # the backend, as `tunesmith serve --backend` names it

    def vocabulary(self, served: Served) -> tuple[int, set[int]]:
        """(the logits' width, the stop token ids) of a served model: what a row's sampler and token mask need."""

    def fits(self, served: Served, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request of this size has room beside the running rows now; False: it waits. May drop cached
        prefixes to make room. A request that could never fit is admitted, and refused by `start`."""

    def start(self, row: Row) -> None:
        """Place an admitted row (its `key` and `slot`); `row.fed` = `row.cached` = the prompt tokens whose KV comes
        from the prefix cache (none for a scoring row, which needs the logits of every position). Raises, saying
        why, for a request this model can never run."""

    def prefill(self, rows: list[Row], chunk: int) -> list:
        """Feed each row (one key, all still reading their prompt) its next `chunk` prompt tokens at most, and
        advance its `fed`. Per row: the logits [V] of its last position fed (float32, CPU), or for a scoring row
        those of every position fed [n, V] (any device)."""

    def step(self, rows: list[Row]):
        """One decode step: each row's `last` token goes in and its `fed` advances by one; logits [len(rows), V]
        (float32, CPU), in the order of `rows`."""

    def release(self, row: Row, keep: bool) -> None:
        """The row has ended: give its place back. With `keep`, the KV of its tokens (`row.fed_ids()`) may stay
        in the prefix cache; without (its forward pass failed), it is dropped."""

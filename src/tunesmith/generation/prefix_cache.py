"""Prompt prefixes the engine has already computed, kept to be reused. Real traffic repeats itself: a conversation
resends its whole history every turn, every request of an app carries the same system prompt and tool
definitions. A new request that begins with the tokens of an earlier one starts from the stored KV of the
longest such prefix, and its decoder computes only the rest (vLLM's automatic prefix caching, llama-server's
`cache_prompt`).

`PrefixCache` holds entries (key, token ids, payload) within a budget in bytes, the least recently used out
first. The key says whose KV an entry is (one served model with one adapter: KV is never shared across
adapters); the payload is the decoder's own (torch: the KV tensors; llama.cpp: a sequence id whose cells hold
them), handed back through `evict` when the entry is dropped. A list searched by binary-searched common prefixes
is enough at the sizes served here (hundreds of entries, not vLLM's millions of blocks)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ..data.tokenize import common_prefix

DEFAULT_MB = 256  # `--prefix-cache-mb`: see ServeConfig.prefix_cache_mb for why


@dataclass
class Entry:
    key: Hashable
    ids: list[int]
    payload: object
    size: int  # bytes


class PrefixCache:
    """Entries by recency (least recently used first), their sizes adding up to at most `budget` bytes."""

    def __init__(self, budget: int, evict: Callable[[object], None] = lambda payload: None):
        self.budget, self.evict = budget, evict
        self.entries: list[Entry] = []
        self.used = 0  # bytes

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def tokens(self) -> int:
        """The tokens all entries hold."""
        return sum(len(e.ids) for e in self.entries)

    def longest(self, key: Hashable, ids: list[int], limit: int) -> tuple[Entry | None, int]:
        """The entry of `key` sharing the most leading tokens with `ids`, and how many it shares (at most
        `limit`); a hit becomes the most recently used."""
        best, most = None, 0
        for entry in self.entries:
            if entry.key == key and (n := min(common_prefix(entry.ids, ids), limit)) > most:
                best, most = entry, n
        if best is not None:
            self.entries.remove(best)
            self.entries.append(best)
        return best, most

    def covers(self, key: Hashable, ids: list[int]) -> bool:
        """Whether an entry of `key` already begins with all of `ids` (storing them would add nothing)."""
        return any(e.key == key and len(e.ids) >= len(ids) and e.ids[:len(ids)] == ids for e in self.entries)

    def put(self, key: Hashable, ids: list[int], payload, size: int) -> bool:
        """Keep `payload` (the KV of `ids`) as the most recently used entry, dropping the entries it extends and,
        beyond the budget, the least recently used. False when it is not kept (too big, or nothing new): the
        payload is then still the caller's."""
        if size > self.budget or not ids or self.covers(key, ids):
            return False
        for entry in [e for e in self.entries if e.key == key and ids[:len(e.ids)] == e.ids]:
            self._drop(entry)  # a prefix of the new one: the new entry answers whatever it would
        self.entries.append(Entry(key, list(ids), payload, size))
        self.used += size
        while self.used > self.budget:
            self._drop(self.entries[0])
        return True

    def pop_oldest(self) -> bool:
        """Drop the least recently used entry; False when there is none."""
        if not self.entries:
            return False
        self._drop(self.entries[0])
        return True

    def drop_keys(self, dead: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose key `dead` says is gone (a model no longer served)."""
        for entry in [e for e in self.entries if dead(e.key)]:
            self._drop(entry)

    def clear(self) -> None:
        """Forget every entry without evicting it (the decoder has dropped the KV itself)."""
        self.entries, self.used = [], 0

    def _drop(self, entry: Entry) -> None:
        self.entries.remove(entry)
        self.used -= entry.size
        self.evict(entry.payload)

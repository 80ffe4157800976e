"""Compiled grammars kept for reuse, within budgets in bytes, and compiled one at a time (grammar.py uses both).

A big legal `response_format` is expensive: a 411 KB JSON schema costs about a second of CPU to compile and
tens of megabytes of llguidance matcher on a 49k-token vocabulary (measured: ~150 bytes of matcher per byte of
grammar text). Sixteen such schemas sent at once took both cores of a 2-core machine from everyone (a plain
chat waited 26.7 s), and a cache that counted 64 compiled grammars held 3.9 GB. So every compile takes
`compiling()`, one process-wide lock (a request whose grammar is cached never waits for it), and the caches count
bytes: `TEMPLATES` (compiled matchers, their size estimated from the grammar text) and `TEXTS` (grammar texts)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

BYTES_PER_GRAMMAR_BYTE = 150  # a compiled matcher's size per byte of its grammar text (measured, see above)
MIN_TEMPLATE_BYTES = 64 * 1024  # what even a small grammar's matcher holds
TEMPLATE_BUDGET = 512 * 2**20  # compiled matchers kept, least recently used dropped first
TEXT_BUDGET = 64 * 2**20  # grammar texts kept

_COMPILE = threading.Lock()


def compiling() -> threading.Lock:
    """The lock every grammar compile holds: one at a time, so compiles never take every core."""
    return _COMPILE


def template_bytes(grammar: str) -> int:
    """The estimated size of the matcher compiled from `grammar`."""
    return max(len(grammar) * BYTES_PER_GRAMMAR_BYTE, MIN_TEMPLATE_BYTES)


class ByteLRU:
    """A thread-safe mapping whose values' sizes add up to at most `budget` bytes, the least recently used
    dropped first; a value larger than the whole budget is not kept."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable):
        """The value kept under `key` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value, size: int) -> None:
        with self._lock:
            self._drop(key)
            if size > self.budget:
                return
            self._items[key] = (value, size)
            self.used += size
            while self.used > self.budget:
                self._drop(next(iter(self._items)))

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.used -= item[1]


TEMPLATES = ByteLRU(TEMPLATE_BUDGET)  # (grammar's _Compiled, grammar text) -> matcher, never advanced
TEXTS = ByteLRU(TEXT_BUDGET)  # (kind, source, strict) -> grammar text

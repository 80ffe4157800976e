"""Progress for every phase that can take more than a few seconds (scoring, generation, comparison entries):
a tqdm bar on a terminal, plain `phase i/n` lines where stderr is not one (CI logs, files), where a bar would be
a mess of carriage returns. Training has its own bar/lines (training/callbacks.py's Progress) in the same style."""

from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress("scoring before: generating", total=80, unit="example") as bar: bar.update(16)`.

    Plain lines: the start, then at most one every EVERY_S seconds, and the end."""

    EVERY_S = 3.0

    def __init__(self, desc: str, total: int, *, unit: str = "example", stream=None):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = self.shown = time.perf_counter()
        self.plain = not getattr(self.stream, "isatty", lambda: False)()
        self._bar = None
        if not self.plain:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)
        else:
            self._line(f"0/{total} {unit}s")

    def _line(self, text: str) -> None:
        print(f"{self.desc} {text}", file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        else:
            now = time.perf_counter()
            if self.done < self.total and now - self.shown < self.EVERY_S:
                return  # a log gets a line every few seconds, not one per example
            self.shown = now
            elapsed = now - self.started
            eta = elapsed / max(self.done, 1) * (self.total - self.done)
            tail = f"({elapsed:.0f}s)" if self.done >= self.total else f"({elapsed:.0f}s, eta {eta:.0f}s)"
            self._line(f"{self.done}/{self.total} {tail}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def phase(desc: str) -> None:
    """Announce a phase that has no count (loading a model, writing a report)."""
    print(desc, file=sys.stderr, flush=True)

"""Progress off a terminal: plain `phase i/n` lines, the first and the last always, one every few seconds
in between (a CI log is not a bar's carriage returns, nor one line per example)."""

from __future__ import annotations

import io

from tunesmith.progress import Progress


def test_plain_lines_start_end_and_throttled_in_between(monkeypatch):
    clock = iter([0.0, 0.5, 1.0, 4.0, 4.5, 9.0])
    monkeypatch.setattr("tunesmith.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    with Progress("scoring", 5, stream=out) as bar:  # t=0: the start line
        for _ in range(5):  # updates at t = 0.5, 1.0, 4.0, 4.5, 9.0
            bar.update()
    assert out.getvalue().splitlines() == ["scoring 0/5 examples", "scoring 3/5 (4s, eta 3s)", "scoring 5/5 (9s)"]

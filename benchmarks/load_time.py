"""Time loading the default chat model: first load (GGUF -> safetensors conversion into an empty cache)
and cached load. Run: .venv/bin/python benchmarks/load_time.py"""

from __future__ import annotations

import os
import platform
import tempfile
import time


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TUNESMITH_CACHE"] = cache
        from tunesmith import models

        timings = {}
        for label in ("first load (converts GGUF)", "cached load", "cached load again"):
            start = time.perf_counter()
            models.load("smollm2-135m-instruct")
            timings[label] = time.perf_counter() - start
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {__import__('torch').get_num_threads()}")
    for label, seconds in timings.items():
        print(f"{label:28} {seconds:6.1f} s")


if __name__ == "__main__":
    main()

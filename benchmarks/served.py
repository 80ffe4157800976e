"""Servers in a subprocess on a free loopback port, for the benchmarks that measure them over HTTP: `tunesmith
serve` (`served`) or any command that answers /health once ready, such as llama.cpp's `llama-server` (`running`).
Each is a context manager: the server is up (its /health answered 200) inside the block and stopped after it,
whatever happens in the block; several at once go in one `contextlib.ExitStack`."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(command: Sequence[str], url: str, env: dict | None = None, timeout: float = 600) -> Iterator[str]:
    """`url` once `command` (a server listening there) answers GET /health with 200; the server is stopped when
    the block ends. Its output goes to a temporary file whose end is shown if it exits or never gets ready."""
    import httpx

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    exited = proc.poll() is not None
                    why = f"exit status {proc.returncode}" if exited else f"no answer in {timeout:.0f} s"
                    raise SystemExit(f"{command[0]} did not start ({why}):\n"
                                     + log.read().decode(errors="replace")[-3000:])
                time.sleep(0.25)
            yield url
        finally:
            if proc.poll() is not None:  # it died while being measured: say how, with the end of its output
                log.seek(0)
                print(f"{command[0]} exited with status {proc.returncode} while measured:\n"
                      + log.read().decode(errors="replace")[-3000:], file=sys.stderr)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def served(model: str, *options: str, threads: int | None = None) -> Iterator[str]:
    """The base URL of `tunesmith serve --model MODEL *options` (conversations kept in memory), up for the block;
    `threads` sets OMP_NUM_THREADS in the server (torch's threads; the llama-cpp backend takes --threads)."""
    port = free_port()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [sys.executable, "-m", "tunesmith", "serve", "--model", model, "--port", str(port),
               "--conversations", ":memory:", *options]
    with running(command, f"http://127.0.0.1:{port}", env) as url:
        yield url


def machine() -> dict:
    """What a figure was measured on: lscpu's model name, the cores this process may use, the load average."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        lscpu = ""
    names = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name:")]
    return {"cpu": names[0] if names else platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "load": os.getloadavg()[0]}


def save(path: Path, info: dict, args, **results) -> None:
    """A benchmark's results as JSON at `path`, with the machine (`machine()`) and the settings it ran with."""
    path.write_text(json.dumps({"machine": info, "settings": {k: str(v) for k, v in vars(args).items()}, **results},
                               indent=1))
    print(f"\nresults and raw rounds: {path}")

"""`tunesmith serve` in a subprocess on a free loopback port, for the benchmarks that measure it over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def start_server(model: str, *options: str, threads: int | None = None) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of `tunesmith serve --model MODEL *options` once /health answers; `threads` sets
    OMP_NUM_THREADS in the server."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--model", model, "--port", str(port),
                             "--conversations", ":memory:", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not start")

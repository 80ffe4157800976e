"""The training process of a job: `python -m tunesmith train CONFIG` started apart from the server (its own
process and session, so a crash or an out-of-memory kill in training cannot take the server down), stopped with
its whole process group, and bound to the server's life: on Linux it is killed when the server dies, even by
kill -9 (prctl PR_SET_PDEATHSIG), and a trainer left from an earlier server is found and killed by its pid."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _dies_with_server():
    """A preexec_fn that asks the kernel to SIGKILL the child when its parent ends, or None where there is no
    prctl. The kernel ties this to the thread that forked, so call `start` from a thread that lives as long as
    the server (its event loop's)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the server died between the fork and the prctl
            os._exit(1)
    return preexec


def start(config: Path, output: Path, *, resume: bool = False) -> subprocess.Popen:
    """`tunesmith train CONFIG [--resume]` in a new session, its output appended to `output`."""
    argv = [sys.executable, "-m", "tunesmith", "train", str(config), *(["--resume"] if resume else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # output lines as they happen, for a failure's reason
    with output.open("ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_dies_with_server())


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group `pid` leads (the trainer and any worker it started)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop a trainer: SIGTERM to its group, SIGKILL if it still runs after `grace_s`. Blocks: off the loop."""
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def kill_leftover(pid: int | None, config: Path, wait_s: float = 10.0) -> bool:
    """Kill the trainer an earlier server started for `config`, if it still runs (where prctl is missing, or a
    server stopped without the kernel's help). The pid must still run `config`, so a reused pid is left alone.
    Reads /proc: on systems without it, nothing is found."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if pid else []
    except OSError:
        return False
    if str(config).encode() not in cmdline:
        return False
    signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return True

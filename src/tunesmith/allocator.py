"""tcmalloc for the commands that train: `tunesmith train`, `continual` and `compare` re-execute themselves once
with tcmalloc preloaded when it is installed and not loaded yet. glibc's malloc returns and re-requests the
large, short-lived activation buffers of every training step from the kernel; tcmalloc keeps them, which makes
CPU training ~30 % faster here (benchmarks/train_throughput.py) at no cost in results. `TUNESMITH_TCMALLOC=0`
turns it off; a user's own LD_PRELOAD is kept (tcmalloc goes first)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SWITCH = "TUNESMITH_TCMALLOC"
# Debian/Ubuntu's libtcmalloc-minimal4 (what setup.sh installs), then other common places.
CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
              "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc(candidates=CANDIDATES) -> str | None:
    return next((c for c in candidates if Path(c).is_file()), None)


def _loaded() -> bool:
    try:
        return "tcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def reexec_with_tcmalloc(argv: list[str], *, library: str | None = None, execve=os.execve) -> None:
    """Replace this process with the same command under tcmalloc, when that is possible and wanted; else
    return and let the command run as it is."""
    if os.environ.get(SWITCH, "1") == "0" or sys.platform != "linux" or _loaded():
        return
    library = library or find_tcmalloc()
    if library is None:
        return
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    # SWITCH=0 in the child: if the preload does not take (a restricted loader), it must not re-execute again.
    env = {**os.environ, "LD_PRELOAD": preload, SWITCH: "0"}
    execve(sys.executable, [sys.executable, "-m", "tunesmith", *argv], env)

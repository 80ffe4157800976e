"""What every exporter shares: `ExportError`, and opening a run for export. The refusals (an existing output
without force, merging what cannot merge, a GGUF of anything but a language model) read the same for each way
out."""

from __future__ import annotations

import os
from pathlib import Path

from .. import runs
from ..errors import TunesmithError

UNMERGEABLE = ("prefix", "prompt")  # soft prompts live outside the weights: there is nothing to merge into


class ExportError(TunesmithError, RuntimeError):
    pass


def refuse_existing(*paths: Path, force: bool) -> None:
    """An export replaces what is already there only with force."""
    for path in paths:
        if path.exists() and not force:
            raise ExportError(f"{path} already exists; pass --force to replace it")


def refuse_unmergeable(info: runs.RunInfo, into: str, instead: str) -> None:
    """Prompt and prefix tuning have no weights to merge `into`; `instead`: the flag to export without."""
    if info.method in UNMERGEABLE:
        raise ExportError(f"{info.method} tuning learns virtual tokens, which cannot be merged into {into}; "
                          f"export the adapter instead (without {instead})")


def open_language_run(run: str | Path) -> runs.RunInfo:
    """The run behind a GGUF export, which holds a language model: an `sft` run, else NotARunError."""
    return runs.open_run(run, task="sft", purpose="exported as GGUF")


def scratch_beside(out: Path, kind: str = "tmp") -> Path:
    """A file name beside `out` for this process (`.NAME-PID.KIND.gguf`), hidden, so the rename into `out` is
    atomic and an interrupted export leaves nothing a user would take for the file."""
    return out.with_name(f".{out.stem}-{os.getpid()}.{kind}.gguf")

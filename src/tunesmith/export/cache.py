"""The run-to-GGUF cache the llama-cpp backend serves from (`tunesmith serve --backend llama-cpp`): a run is
exported once, at `--gguf-quant` (q8_0 unless told otherwise), verified against the run, and kept under the
tunesmith cache directory, keyed by the run's content and the quant type, so a changed run is exported again."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .. import runs
from ..models import cache_dir
from ..version import __version__
from .common import ExportError
from .gguf import export_gguf
from .quants import FINER
from .verify import verify_gguf

# The type runs are exported at for llama.cpp (`--gguf-quant`). q8_0: on the project's 2-core CPU it decodes one
# reply 1.6x as fast as f16 (81 against 51 tokens/s; half the bytes read per token), with top-1 agreement 0.97 and
# mean KL 8e-3 against the run on SmolLM2 (docs/gguf.md). f16 is exact; 4-bit is faster, but lost the demo run's
# training (docs/backends.md).
GGUF_QUANT = "q8_0"
CHECKS = 2  # part of every cache key: raised when what an export must pass changes (2: the training kept)


class ExportMismatch(ExportError):
    """A run's export did not match the run, so nothing was cached; the message says which finer type to serve."""


def run_key(run: Path, quant: str = GGUF_QUANT) -> str:
    """The cache key of a run's export: its name and a hash of every file that makes its weights (checkpoints and
    the training log aside), with the tunesmith version, the quant type and the checks it passed."""
    digest = hashlib.sha256(f"{__version__}\0{quant}\0{CHECKS}".encode())
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        relative = path.relative_to(run).as_posix()
        if relative.split("/")[0] in (runs.CHECKPOINTS, runs.LOG):
            continue
        digest.update(f"\0{relative}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return f"{run.resolve().name}-{digest.hexdigest()[:16]}"


def exported(run: Path, quant: str = GGUF_QUANT) -> Path:
    """The run as a GGUF file in the cache, exported on first use. Written in a temporary directory and renamed
    into place, so an interrupted export never leaves a file that a later start would trust."""
    target = cache_dir() / "gguf" / run_key(Path(run), quant)
    path = target / "model.gguf"
    if path.is_file():
        return path
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"tunesmith: exporting {run} to GGUF {quant} once for llama.cpp; cached in {target}", file=sys.stderr,
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # Verified against the run with transformers where it reads the architecture (llama.cpp loads the file
        # next, in this process: tests/test_backends.py compares its replies with the torch engine's), and with
        # llama.cpp, in a child process, for the families only llama.cpp reads (verify.TRANSFORMERS_READS).
        export_gguf(run, tmp / "model.gguf", quant=quant, force=True, verify=False)
        report = verify_gguf(run, tmp / "model.gguf", llama_cpp=False)
        if not report.ok:
            raise ExportMismatch(f"{run} exported at {quant} does not match the run ({'; '.join(report.problems)}); "
                                 f"serve it at a finer --gguf-quant such as {FINER.get(quant, 'f32')}, or export it "
                                 "yourself with `tunesmith export RUN --gguf --no-verify` and serve that file")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same export first; theirs is as good
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path

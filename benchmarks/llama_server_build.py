"""llama.cpp's own `llama-server`, the bar the llama-cpp backend is measured against: the one given, the one on
PATH, or one built from the llama.cpp source that the pinned llama-cpp-python vendors (the same C++ the backend
runs), so the two differ only in the serving code around it.

    .venv/bin/python benchmarks/llama_server_build.py [--jobs 2]      # build it (or find it) and print its path

The build follows `make setup-fast`: llama-cpp-python's sdist at requirements.lock's version (the one in
.venv/src when setup-fast kept it, else `pip download` into the cache), its vendor/llama.cpp configured with the
Makefile's LLAMA_CMAKE flags (portable AVX2, AMX off: see the Makefile for why) and built for the one target,
statically linked. The binary is kept in the tunesmith cache directory ($TUNESMITH_CACHE or ~/.cache/tunesmith),
under llama-server/<version>-<hash of the flags>, so only the first run compiles (C++, minutes on 2 cores)."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What llama-server needs and nothing else: no web page (prebuilt from the Hub or npm), no HTTPS client, no tests.
EXTRA_CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_OPENSSL=OFF"]


def pinned_version() -> str:
    """llama-cpp-python's version in requirements.lock (the Makefile's LLAMA_PIN)."""
    found = re.search(r"^llama-cpp-python==(\S+)", (ROOT / "requirements.lock").read_text(), re.MULTILINE)
    if found is None:
        raise SystemExit("requirements.lock pins no llama-cpp-python")
    return found.group(1)


def makefile_cmake_flags() -> list[str]:
    """The Makefile's LLAMA_CMAKE, read from it so the two builds cannot drift apart."""
    found = re.search(r"^LLAMA_CMAKE :=((?:.*\\\n)*.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    if found is None:
        raise SystemExit("the Makefile defines no LLAMA_CMAKE")
    return found.group(1).replace("\\\n", " ").split()


def sdist(version: str, cache: Path) -> Path:
    """llama-cpp-python's sdist: the copy `make setup-fast` keeps in .venv/src, else one downloaded into `cache`."""
    name = f"llama_cpp_python-{version}.tar.gz"
    for candidate in (ROOT / ".venv" / "src" / name, Path(sys.prefix) / "src" / name, cache / name):
        if candidate.is_file():
            return candidate
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "download", "--no-deps",
                    "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", str(cache)], check=True)
    return cache / name


def build(jobs: int = 2) -> Path:
    """The cached llama-server built from the pinned source, compiled first if it is not there yet."""
    from tunesmith.models import cache_dir

    version, flags = pinned_version(), makefile_cmake_flags() + EXTRA_CMAKE
    home = cache_dir() / "llama-server"
    binary = home / f"{version}-{hashlib.sha256(' '.join(flags).encode()).hexdigest()[:10]}" / "llama-server"
    if binary.is_file():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    tarball = sdist(version, home)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=home) as work:
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(work, members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        source, out = Path(work) / prefix, Path(work) / "build"
        print(f"building llama-server from llama.cpp in llama-cpp-python {version}, -j{jobs} ...", flush=True)
        subprocess.run(["cmake", "-S", str(source), "-B", str(out), *flags], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(out), "--target", "llama-server", "-j", str(jobs)], check=True,
                       stdout=subprocess.DEVNULL)
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "bin" / "llama-server", binary.with_suffix(".tmp"))
        os.replace(binary.with_suffix(".tmp"), binary)  # only a whole binary ever has the final name
    print(f"built {binary} in {time.perf_counter() - started:.0f} s", flush=True)
    return binary


def llama_server(given: str | None = None, jobs: int = 2) -> Path:
    """The llama-server to measure: `given`, else one on PATH, else the cached build of the pinned source."""
    if given:
        path = Path(given).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SystemExit(f"--llama-server {given}: not an executable file")
        return path
    on_path = shutil.which("llama-server")
    return Path(on_path) if on_path else build(jobs)


def version_of(binary: Path) -> str:
    """What `llama-server --version` says about its build (one line)."""
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("version", "built"))]
    return "; ".join(lines) or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", help="use this binary instead of PATH's or the cached build")
    parser.add_argument("--jobs", type=int, default=2, help="compile jobs (default: 2)")
    args = parser.parse_args(argv)
    binary = llama_server(args.llama_server, args.jobs)
    print(f"{binary}: {version_of(binary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

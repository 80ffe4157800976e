"""The training commands re-execute themselves once under tcmalloc: the same command line, tcmalloc first in
LD_PRELOAD (a user's own preload kept), never twice, and not at all when switched off or not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunesmith import allocator


@pytest.fixture
def calls(monkeypatch):
    monkeypatch.setattr(allocator, "_loaded", lambda: False)
    monkeypatch.delenv(allocator.SWITCH, raising=False)
    made = []
    return made, lambda path, args, env: made.append((path, args, env))


def test_reexecutes_the_same_command_with_tcmalloc_first(calls, monkeypatch, tmp_path):
    made, execve = calls
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setenv("LD_PRELOAD", "/opt/mine.so")
    allocator.reexec_with_tcmalloc(["train", "x.yaml", "lr=1"], library=allocator.find_tcmalloc([str(lib)]),
                                   execve=execve)
    [(path, args, env)] = made
    assert path == sys.executable and args == [sys.executable, "-m", "tunesmith", "train", "x.yaml", "lr=1"]
    assert env["LD_PRELOAD"] == f"{lib} /opt/mine.so" and env[allocator.SWITCH] == "0"


def test_not_when_switched_off_missing_or_already_loaded(calls, monkeypatch, tmp_path):
    made, execve = calls
    assert allocator.find_tcmalloc([str(tmp_path / "missing.so")]) is None
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    allocator.reexec_with_tcmalloc(["train"], execve=execve)  # not installed
    monkeypatch.setenv(allocator.SWITCH, "0")
    allocator.reexec_with_tcmalloc(["train"], library="/x.so", execve=execve)  # switched off (or the child)
    monkeypatch.delenv(allocator.SWITCH)
    monkeypatch.setattr(allocator, "_loaded", lambda: True)
    allocator.reexec_with_tcmalloc(["train"], library="/x.so", execve=execve)  # preloaded by the user
    assert made == []


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc is not installed here")
def test_the_child_really_runs_under_tcmalloc(tmp_path):
    """End to end through `python -m tunesmith train`: the re-executed process has tcmalloc mapped (it reports
    its error about the missing config from there)."""
    probe = tmp_path / "sitecustomize.py"  # runs in the child before the CLI: records whether tcmalloc is mapped
    probe.write_text("import pathlib, os\nif os.environ.get('TUNESMITH_TCMALLOC') == '0':\n"
                     "    pathlib.Path(os.environ['PROBE_OUT']).write_text(str('tcmalloc' in "
                     "pathlib.Path('/proc/self/maps').read_text()))\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{':'.join(sys.path[1:])}",
           "PROBE_OUT": str(tmp_path / "out")}
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(tmp_path / "none.yaml")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("tunesmith: error:") and "Traceback" not in done.stderr
    assert (tmp_path / "out").read_text() == "True"

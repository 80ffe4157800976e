"""The run directory's format, in one place: every file name, reading and writing them, claiming a directory
for a new run, and the checkpoints a run can be resumed from. A finished run holds

    run/
      adapter_model.safetensors + adapter_config.json   (PEFT methods)  or  model.safetensors + config.json
      tokenizer files (incl. chat_template.jinja)
      train_config.yaml   the resolved config
      run.json            task, base model, method, label map, chat-template fingerprint and variables, versions,
                          and the defaults chosen for what the config left unset, one line of why each (defaults)
      log.jsonl           one line per log/eval event: step, loss, lr, eval metrics
      metrics.json        {"before": ..., "after": ..., "train": ...} ("before_kind" says what "before" scored)
      predictions.jsonl   the trained model on the eval split: input, gold, prediction, correct

and, while it trains, checkpoints/checkpoint-N/ (resumed from only once marked complete) and
metrics_before.json. `tunesmith eval --output` writes the same metrics.json and predictions.jsonl.

A leaf module: it imports nothing else of tunesmith but errors, so models, training and evaluation all use it."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import TunesmithError

log = logging.getLogger(__name__)

RUN_INFO = "run.json"
CONFIG = "train_config.yaml"
LOG = "log.jsonl"
METRICS = "metrics.json"
METRICS_BEFORE = "metrics_before.json"  # the base model's score, kept across an interrupted attempt
STEP_TIME = "step_time.json"  # the step timed for a default plan on a CPU: a resumed run plans the same
PREDICTIONS = "predictions.jsonl"
CHECKPOINTS = "checkpoints"
COMPLETE = "tunesmith-complete"  # written last into a checkpoint: only marked checkpoints are resumed from
# What transformers and peft save beside the weights that is no artifact: a pickle and peft's empty model card.
NOT_ARTIFACTS = ("training_args.bin", "README.md")
# Files a run writes before its first complete checkpoint; nothing a user made.
_LEFTOVERS = (CHECKPOINTS, LOG, METRICS_BEFORE, STEP_TIME)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# A report directory (`tunesmith compare` and `tunesmith continual` write the same names) holds the resolved
# config the command ran (its name says which command: REPORT_CONFIGS), the report and, for a comparison, one
# directory per entry with ENTRY, RESULT and DONE.
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REPORT_CONFIGS = {"compare": "compare.yaml", "continual": "continual.yaml"}
ENTRY = "entry.json"  # what a comparison entry runs, written before it starts
RESULT = "result.json"  # what it measured, written before DONE
DONE = "done"  # a comparison entry's marker: it finished, a re-run skips it


class RunError(TunesmithError, RuntimeError):
    """A run that cannot start as asked (e.g. its directory already holds another run)."""


class NotARunError(RunError):
    """A path given as a run that holds no finished tunesmith run (or one of another task than needed)."""


@dataclass(frozen=True)
class RunInfo:
    """run.json, typed: what a finished run is and where it came from. Open one with `open_run`."""

    path: Path  # the run directory, resolved (not stored in run.json)
    task: str  # "sft", "classify" or "ner"
    base_model: str  # the model the run's weights or adapter sit on
    method: str  # methods.METHODS key
    peft: bool  # an adapter over base_model (False: the directory holds whole weights)
    labels: list[str] | None = None  # classification/NER label map, in the head's order
    chat_template_fingerprint: str | None = None  # of the template the run trained with (sft)
    defaults: dict = field(default_factory=dict)  # what training/defaults.py chose, and why: {field: line}
    versions: dict = field(default_factory=dict)  # {package: version} at training time
    data: dict | None = None  # {"train": file_record, "eval": file_record | None}
    replay: dict | None = None  # what lineage.mix_replay mixed in
    parent: dict | None = None  # {"path", "task", "method", "base_model"} of the run continued
    lineage: list[dict] = field(default_factory=list)  # every run continued, oldest first
    regularization: dict | None = None  # the anti-forgetting penalty used
    tools: dict | None = None  # how tool data was rendered (data.tools.rendering), None without tools in the data
    # sft: the chat template variables it trained with (data.chat_template_kwargs, e.g. {"enable_thinking": false}),
    # which eval, generate, chat and serve apply to the run by default; None: none
    chat_template_kwargs: dict | None = None
    reasoning: str | None = None  # sft: the policy for reasoning_content it trained with (data.reasoning)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept when written back

    @classmethod
    def from_dict(cls, data: dict, path: str | Path) -> "RunInfo":
        known = {f.name for f in fields(cls)} - {"path", "extra"}
        return cls(path=Path(path).resolve(), **{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("path")
        return {**data.pop("extra"), **data}

    @property
    def train_data(self) -> dict | None:
        """The file record ({"path", "sha256", "examples"}) of the data the run trained on, if recorded."""
        return (self.data or {}).get("train")

    @property
    def starts_from(self) -> str:
        """Where a run that continues this one starts: the base model under an adapter, or these weights."""
        return self.base_model if self.peft else str(self.path)

    def link(self) -> dict:
        """The entry a child run records for this one in its `parent` and `lineage`."""
        return {"path": str(self.path), "task": self.task, "method": self.method, "base_model": self.base_model}


MAX_INFO_BYTES = 10_000_000  # a run.json is a few kilobytes; anything near this is not one


def read_regular(path: str | Path, max_bytes: int | None = None, *, within: str | Path | None = None) -> bytes:
    """The bytes of the regular file at `path` (at most `max_bytes`). FileNotFoundError when there is none;
    another OSError when it is not a regular file (a FIFO, a device, a directory: never opened for reading, so
    nothing can block on it) or, with `within`, when it resolves outside that directory (a symbolic link out)."""
    real = os.path.realpath(path)
    if within is not None:
        root = os.path.realpath(within)
        if os.path.commonpath([root, real]) != root:
            raise PermissionError(errno.EACCES, f"resolves outside {root}", str(path))
    before = os.stat(real)
    if not stat.S_ISREG(before.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):  # swapped since it was looked at
            raise OSError(errno.EAGAIN, "the file changed while being opened", str(path))
        return f.read() if max_bytes is None else f.read(max_bytes)


def _kind(value) -> str:
    """A JSON value's type in words."""
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(
        type(value), "a number")


def _options(hint) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)


def _expected(hint) -> str:
    """A RunInfo field's type in JSON words: "a list of strings or null"."""
    words = {str: "a string", bool: "true or false", dict: "an object", type(None): "null", list: "a list"}
    out = []
    for option in _options(hint):
        args = typing.get_args(option)
        out.append(f"a list of {words[args[0]].split(' ', 1)[1]}s" if args else words.get(option, str(option)))
    return " or ".join(out)


def _matches(value, hint) -> bool:
    """Whether a JSON value has the type of a RunInfo field (`str`, `list[str] | None`, `dict`, ...)."""
    for option in _options(hint):
        origin, args = typing.get_origin(option) or option, typing.get_args(option)
        if option is type(None):
            if value is None:
                return True
        elif origin is list:
            if isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list):
                return True
        elif origin is bool or not isinstance(value, bool):  # true is no string, and no number either
            if isinstance(value, origin):
                return True
    return False


def _record_problem(data: dict) -> str | None:
    """What keeps a run.json object from being a RunInfo: a required field missing, or a field of another type."""
    hints = typing.get_type_hints(RunInfo)
    own = [f for f in fields(RunInfo) if f.name not in ("path", "extra")]
    missing = [f.name for f in own if f.default is MISSING and f.default_factory is MISSING and f.name not in data]
    if missing:
        return f"has no {', '.join(missing)}, which every run's record has"
    for f in own:
        if f.name in data and not _matches(data[f.name], hints[f.name]):
            return f"has {_kind(data[f.name])} for {f.name}, where a run's record has {_expected(hints[f.name])}"
    return None


def find_run(path: str | Path, within: str | Path | None = None) -> RunInfo | None:
    """The finished run at `path`, or None when `path` holds none (a model name, a data file, a plain model, a
    run.json that is no regular file, or with `within`, one that resolves outside that directory). NotARunError,
    naming the problem, for a run.json that cannot be read as a run's record."""
    file = Path(path) / RUN_INFO
    try:
        raw = read_regular(file, MAX_INFO_BYTES + 1, within=within)
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the path
        return None
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES if within else None):
            return None
        raise NotARunError(f"{path}: {RUN_INFO} is unreadable ({err.strerror or err}); train the run again") from None
    if len(raw) > MAX_INFO_BYTES:
        raise NotARunError(f"{path}: {RUN_INFO} is larger than {MAX_INFO_BYTES // 1_000_000} MB, too large to be a "
                           "run's record; train the run again")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise NotARunError(f"{path}: {RUN_INFO} is nested too deeply to be a run's record; train the run again") \
            from None
    except ValueError as err:  # not UTF-8, not JSON, or a number of more digits than Python reads
        raise NotARunError(f"{path}: {RUN_INFO} is unreadable ({err}); train the run again") from None
    problem = "is not a JSON object, as a run's record is" if not isinstance(data, dict) else _record_problem(data)
    if problem:
        raise NotARunError(f"{path}: {RUN_INFO} {problem}; train the run again")
    return RunInfo.from_dict(data, path)


def open_run(path: str | Path, task: str | None = None, purpose: str | None = None) -> RunInfo:
    """The finished run at `path`, checked: NotARunError when it holds none, or (with `task`) when it is a run
    of another task; `purpose` ("exported as GGUF") finishes that sentence."""
    info = find_run(path)
    if info is None:
        raise NotARunError(f"{path} is not a finished tunesmith run (no {RUN_INFO})")
    if task is not None and info.task != task:
        raise NotARunError(f"{path} is a {info.task} run; only {task} runs can be {purpose or 'used here'}")
    return info


# ---------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------

def write_text(path: Path, text: str) -> None:
    """Write a whole file atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2))


def read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable (truncated by a kill: recomputed)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:
        log.warning("%s is unreadable (%s); computing it again", path, err)
        return None


def write_info(run_dir: Path, info: RunInfo | dict) -> None:
    write_json(run_dir / RUN_INFO, info.to_dict() if isinstance(info, RunInfo) else info)


def read_metrics(directory: str | Path) -> dict:
    return json.loads((Path(directory) / METRICS).read_text(encoding="utf-8"))


def write_metrics(directory: Path, metrics: dict) -> None:
    write_json(directory / METRICS, metrics)


def read_predictions(directory: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(directory) / PREDICTIONS).read_text(encoding="utf-8").splitlines()]


def write_predictions(directory: Path, predictions: list[dict]) -> None:
    """One JSON object per line (input, gold, prediction, correct), non-ASCII text kept as it is."""
    write_text(directory / PREDICTIONS, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))


def append_log(run_dir: Path, entry: dict) -> None:
    with (run_dir / LOG).open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(run_dir: str | Path, max_bytes: int | None = None, within: str | Path | None = None) -> list[dict]:
    """log.jsonl's entries, oldest first: every complete line holding a JSON object (a half-written last line,
    left by a kill or still being written, is skipped). `max_bytes` reads only the file's start; none when the
    log is no regular file or (with `within`) resolves outside that directory."""
    try:
        raw = read_regular(Path(run_dir) / LOG, max_bytes, within=within)
    except (OSError, ValueError):
        return []
    entries = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def truncate_log(run_dir: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed from (they will be written again), and a
    half-written last line left by a kill."""
    if not (run_dir / LOG).exists():
        return
    kept = [entry for entry in read_log(run_dir) if entry.get("step", 0) <= step]
    write_text(run_dir / LOG, "".join(json.dumps(entry) + "\n" for entry in kept))


# ---------------------------------------------------------------------------------------------------------
# the directory's life: claimed, checkpointed, finished
# ---------------------------------------------------------------------------------------------------------

def is_complete(run_dir: str | Path) -> bool:
    """Whether the directory holds a finished run (run.json is written once training is over)."""
    return (Path(run_dir) / RUN_INFO).exists()


def claim(run_dir: Path, resume: bool) -> None:
    """Never overwrite what a user has: a finished run or someone else's files stop a new run here."""
    checkpoints = run_dir / CHECKPOINTS
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"output_dir {run_dir} is a file, not a directory; set output_dir to a new directory")
    if resume:
        if not complete_checkpoints(checkpoints):
            raise RunError(f"{run_dir}: no complete checkpoint to resume from")
        return
    if is_complete(run_dir):
        raise RunError(f"{run_dir} already holds a finished run; set output_dir to a new directory")
    if complete_checkpoints(checkpoints):
        raise RunError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it, "
                       "or set output_dir to a new directory")
    if run_dir.exists() and any(p.name not in _LEFTOVERS for p in run_dir.iterdir()):
        raise RunError(f"{run_dir} exists and is not empty; set output_dir to a new directory")
    # What is left is only ours, from a run stopped before its first complete checkpoint: start it afresh.
    for name in _LEFTOVERS:
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints that were fully written (carry the COMPLETE marker), oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / COMPLETE).exists()]
    return [p for _, p in sorted(found)]


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"checkpoint-{step}"  # transformers' name for it


def checkpoint_step(checkpoint: Path) -> int:
    return int(_CHECKPOINT.match(checkpoint.name).group(1))


def mark_complete(checkpoint: Path, marker: dict) -> None:
    """Write the marker (atomically) once everything else of the checkpoint is on disk."""
    write_text(checkpoint / COMPLETE, json.dumps(marker))


def read_marker(checkpoint: Path) -> dict:
    return json.loads((checkpoint / COMPLETE).read_text())


def prune_checkpoints(directory: Path, keep: int, best: str | None) -> None:
    """Delete all but the `keep` newest complete checkpoints (and `best`). Each is renamed away before deletion
    so a half-deleted one is never mistaken for a usable one."""
    for old in complete_checkpoints(directory)[:-keep]:
        if best and Path(best).resolve() == old.resolve():
            continue
        trash = old.with_name(f".deleting-{old.name}")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def drop_non_artifacts(run_dir: Path) -> None:
    for extra in NOT_ARTIFACTS:
        (run_dir / extra).unlink(missing_ok=True)


def finish(run_dir: Path) -> None:
    """What only an unfinished run needs goes once its metrics are written: the kept "before" and checkpoints."""
    (run_dir / METRICS_BEFORE).unlink(missing_ok=True)
    (run_dir / STEP_TIME).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)

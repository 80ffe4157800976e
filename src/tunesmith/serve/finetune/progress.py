"""What a job's run says about its progress, in OpenAI's words: log.jsonl's lines as `metrics` events (step and
training loss, validation loss, the end of training), metrics.json's before/after as one event, the checkpoints
a client can list, and the reason a failed job's process gives in its output. Reads files only."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from ... import runs

TAIL_BYTES = 64_000  # of the job's output, searched for why it failed
REASON_CHARS = 2_000  # a failure reason longer than this is cut (the output file has it all)


def _metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def log_events(entries: list[dict], notes: dict, total_steps: int | None) -> list[dict]:
    """The events (keyword arguments of JobStore.event) of the log entries not reported before. `notes` keeps
    the last step reported of each kind, so a log rewritten on resume (runs.truncate_log) reports a step once."""
    events = []
    of = f"/{total_steps}" if total_steps else ""
    for entry in entries:
        step = entry.get("step", 0)
        if "loss" in entry and step > notes.get("loss_step", 0):
            notes["loss_step"] = step
            data = {"step": step, "train_loss": entry["loss"], "total_steps": total_steps, "epoch": entry.get("epoch"),
                    "learning_rate": entry.get("lr")}
            events.append({"message": f"Step {step}{of}: training loss={_metric(entry['loss'])}", "data": data,
                           "type": "metrics"})
        if "eval_loss" in entry and step > notes.get("eval_step", 0):
            notes["eval_step"] = step
            scores = {k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_")
                      and isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second"))}
            data = {"step": step, "valid_loss": scores.pop("loss"), **scores}
            events.append({"message": f"Step {step}{of}: validation loss={_metric(data['valid_loss'])}",
                           "data": data, "type": "metrics"})
        if "train_loss" in entry and not notes.get("trained"):
            notes["trained"] = True
            data = {"step": step, "train_loss": entry["train_loss"], "train_runtime": entry.get("train_runtime")}
            events.append({"message": f"Training finished at step {step}: mean training loss="
                                      f"{_metric(entry['train_loss'])}", "data": data, "type": "metrics"})
    return events


def metrics_event(run_dir: Path) -> dict | None:
    """One event with the run's scores before and after training (metrics.json), None when it has none."""
    try:
        metrics = runs.read_metrics(run_dir)
    except (OSError, ValueError):
        return None
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    names = [n for n in dict.fromkeys([*before, *after]) if n != "examples"
             and isinstance(before.get(n, after.get(n)), (int, float))]
    if not names:
        return None
    shown = "; ".join(f"{n} {_metric(before.get(n, '-'))} -> {_metric(after.get(n, '-'))}" for n in names)
    return {"message": f"Metrics before -> after training: {shown}", "type": "metrics",
            "data": {"before": {n: before.get(n) for n in names}, "after": {n: after.get(n) for n in names}}}


def trained_tokens(run_dir: Path) -> int | None:
    try:
        return runs.read_metrics(run_dir).get("train", {}).get("tokens_seen")
    except (OSError, ValueError):
        return None


def failure_reason(output: Path, returncode: int) -> str:
    """Why the job's process failed, in a sentence: tunesmith's own `tunesmith: error:` message, else the
    exception a crash ended with, else how the process ended."""
    try:
        with output.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - TAIL_BYTES))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    said = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("tunesmith: error: ")), None)
    if said is not None:
        reason = "; ".join(line.strip() for line in lines[said:] if line.strip()).removeprefix("tunesmith: error: ")
        return reason[:REASON_CHARS]
    crash = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)), None)
    if crash is not None:
        return f"the training process crashed: {crash[:REASON_CHARS]} (the whole output: {output})"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = "; out of memory?" if returncode == -signal.SIGKILL else ""
        return f"the training process was killed by {name}{why} (its output: {output})"
    return f"the training process exited with code {returncode} (its output: {output})"


def _mtime(path: Path) -> int | None:
    try:
        return int(path.stat().st_mtime)
    except OSError:  # a checkpoint pruned while it was listed
        return None


def _loss_at(entries: list[dict], step: int, key: str):
    return next((e[key] for e in reversed(entries) if key in e and e.get("step", 0) <= step), None)


def checkpoints(jid: str, run_dir: Path, model: str | None, finished: bool) -> list[dict]:
    """OpenAI's checkpoint objects of a job, newest first: while it trains, each complete checkpoint of its run
    (what a resume starts from); once it succeeded, the finished run (tunesmith keeps only the run's final
    weights, so earlier checkpoints are gone by then)."""
    entries = runs.read_log(run_dir)
    if finished:
        step = max((e.get("step", 0) for e in entries), default=0)
        found = [(step, model, _mtime(run_dir / runs.RUN_INFO))]
    else:
        found = [(runs.checkpoint_step(p), f"{model}:ckpt-step-{runs.checkpoint_step(p)}",
                  _mtime(p / runs.COMPLETE))
                 for p in reversed(runs.complete_checkpoints(run_dir / runs.CHECKPOINTS))]
    return [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{jid.split('-')[-1]}-{step}",
             "created_at": created or int(time.time()), "fine_tuned_model_checkpoint": name,
             "fine_tuning_job_id": jid, "step_number": step,
             "metrics": {"step": step, "train_loss": _loss_at(entries, step, "loss"),
                         "valid_loss": _loss_at(entries, step, "eval_loss")}}
            for step, name, created in found]

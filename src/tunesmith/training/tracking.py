"""Experiment trackers (`report_to: tensorboard | mlflow | wandb`): transformers' own integrations log the steps;
this module checks the tracker's package is there, points it at the run, and sends it the run's summary
(before/after metrics and the defaults' reasons), which the Trainer never sees.

Offline first: TensorBoard writes to RUN/tensorboard, MLflow to MLFLOW_TRACKING_URI (mlflow's default when
unset), and wandb runs with WANDB_MODE=offline unless the environment says otherwise."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import TunesmithError

# tracker -> (the module transformers' integration imports, the package that provides it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
TENSORBOARD_DIR = "tensorboard"  # inside the run directory


class TrackingError(TunesmithError):
    """A tracker asked for whose package is not installed."""


def check(report_to: list[str]) -> None:
    """Fail before any work when a tracker's package is missing (transformers would only warn, late)."""
    for tracker in report_to:
        module, package = PACKAGES[tracker]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"report_to: {tracker} needs the {package} package: pip install {package}")


def environment(report_to: list[str], run_dir: Path) -> dict[str, str]:
    """Environment variables the integrations read at setup: TensorBoard's directory is the run's (transformers'
    default is inside the checkpoints, which a finished run deletes); wandb stays on this machine unless told."""
    env = {}
    if "tensorboard" in report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(run_dir / TENSORBOARD_DIR)
    if "wandb" in report_to:
        env["WANDB_MODE"] = os.environ.get("WANDB_MODE", "offline")
    return env


def summary(metrics: dict, reasons: dict) -> dict:
    """The flat record sent once after training: before/<key> and after/<key> numbers, defaults/<field> reasons."""
    flat = {f"{phase}/{key}": value for phase in ("before", "after")
            for key, value in (metrics.get(phase) or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {**flat, **{f"defaults/{field}": line for field, line in reasons.items()}}


def log_summary(trainer, record: dict) -> None:
    """Send `record` to the trainer's tracker callbacks only (log.jsonl keeps the steps alone), reopening what
    on_train_end closed, then closing it again."""
    from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

    for callback in trainer.callback_handler.callbacks:
        if not isinstance(callback, (TensorBoardCallback, MLflowCallback, WandbCallback)):
            continue
        logs = record
        if isinstance(callback, MLflowCallback):
            logs = _reopen_mlflow(record)
        callback.on_log(trainer.args, trainer.state, trainer.control, logs=logs)
        callback.on_train_end(trainer.args, trainer.state, trainer.control)


def _reopen_mlflow(record: dict) -> dict:
    """MLflow ended the run at on_train_end and would start a new one: resume it. Its metrics are numbers, so
    the reasons go in as a JSON artifact."""
    import mlflow

    if mlflow.active_run() is None and mlflow.last_active_run() is not None:
        mlflow.start_run(run_id=mlflow.last_active_run().info.run_id)
    mlflow.log_dict({k: v for k, v in record.items() if isinstance(v, str)}, "defaults.json")
    return {k: v for k, v in record.items() if not isinstance(v, str)}

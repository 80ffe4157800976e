"""What scoring returns and how it is saved: `Evaluation` (metrics and one prediction per example) and
`write_results` (the run directory's metrics.json and predictions.jsonl, runs.py). A leaf: every scorer and
every caller imports it, it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import runs
from ..errors import TunesmithError


class EvaluateError(TunesmithError, ValueError):
    """Data or a model that cannot be scored as asked; the message says what to change."""


@dataclass
class Evaluation:
    metrics: dict
    predictions: list[dict] = field(default_factory=list, repr=False)  # input, gold, prediction, correct


def write_results(result: Evaluation, directory: str | Path) -> Path:
    """metrics.json and predictions.jsonl (input, gold, prediction, correct per line) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    runs.write_metrics(directory, result.metrics)
    runs.write_predictions(directory, result.predictions)
    return directory

"""Training: `train(config)` runs the one loop for every task and method and returns the `Run` it wrote.

- data.py       the splits, a check that the records suit the task, labels, features, collators
- defaults.py   what a config leaves unset (learning rate, epochs, warm-up, evaluations), chosen per run, and why
- callbacks.py  log.jsonl, the progress bar, AdaLoRA's budget step, eval metrics, RunTrainer's atomic checkpoints
- loop.py       train(): the base model scored before, the method applied, Trainer run, the run dir written

What a run directory holds, and the checkpoints it resumes from, is runs.py's."""

from ..runs import RunError
from .data import load_splits, sft_records
from .loop import Run, train

__all__ = ["Run", "RunError", "load_splits", "sft_records", "train"]

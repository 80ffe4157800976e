"""Training: `train(config)` runs the one loop for every task and method and returns the `Run` it wrote.

- loop.py        train(), read as its phases: data, model (or parent run), defaults, score before, method,
                 Trainer, precision, fit, save (run.json last)
- data.py        the splits, a check that the records suit the task, labels, features, collators
- lineage.py     where a run comes from: its data files, the run it continues, the earlier data it replays
- defaults.py    what a config leaves unset (learning rate, epochs, warm-up, evaluations), chosen per run, and why
- callbacks.py   log.jsonl, the progress bar, AdaLoRA's budget step, eval metrics, RunTrainer's atomic checkpoints
- precision.py   frozen weights in bf16 and activation recomputation, chosen per device
- loss.py        the sft loss with the LM head applied only where there are labels (and the replies' log-probs)
- preference.py  task: preference: DPO, ORPO, SimPO and KTO, TRL's losses on tunesmith's Trainer
- preference_data.py  each reply tokenized after its prompt, pairs collated, the reference's log-probs attached
- regularize.py  the pull toward a parent run's weights (L2-SP, EWC)

Importing this package imports transformers' Trainer (callbacks.py); `import tunesmith` loads it only when
`tunesmith.train` is first asked for. What a run directory holds, and the checkpoints it resumes from, is
runs.py's."""

from ..runs import RunError
from .data import load_splits, sft_records
from .loop import Run, train

__all__ = ["Run", "RunError", "load_splits", "sft_records", "train"]

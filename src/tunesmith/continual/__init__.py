"""Continual learning: a run learns new tasks later, and tunesmith measures what it forgot.

- config.py   the sequence file: tasks in order, strategies (sequential with replay/regularisation, or per-task
              adapters), shared training settings
- runner.py   `run()`: every strategy over the sequence, every task scored after every step, resumable
- probe.py    general-ability retention on shipped everyday prompts
- summary.py  average score, forgetting, backward and forward transfer from the score matrix
- report.py   report.json / .md / .html with heat-maps and per-task curves

Training itself (continue_from, replay, regularization) is the training loop's: see training/lineage.py; the
report's page, tables and number formats are shared with compare/'s: see reporting/."""

from .config import ContinualConfig, load_sequence
from .runner import run

__all__ = ["ContinualConfig", "load_sequence", "run"]

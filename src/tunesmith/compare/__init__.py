"""Comparing ways to adapt a model: one task, one eval split, one seed, several entries (zero-shot, k-shot, prompt
or prefix tuning, LoRA, freeze, full; each with its own overrides), run in turn and reported side by side.

- config.py   the comparison file: the shared base config and the entries, each validated before anything runs
- runner.py   `run()`: every entry not yet done (each in its own process by default), resumable
- report.py   report.json / .md / .html with the metrics and costs table, a metric chart and the loss curves

The report's page, tables and number formats are shared with continual/'s: see reporting/."""

from .config import CompareConfig, Entry, entry_config, load_compare
from .runner import CompareError, run, run_entry

__all__ = ["CompareConfig", "CompareError", "Entry", "entry_config", "load_compare", "run", "run_entry"]

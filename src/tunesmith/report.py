"""Transitional: the report kit moved to tunesmith.reporting, the comparison's report to compare/report.py and
the headline metrics to metrics.py; this module goes once cli.py and training/defaults.py import from there."""

from .metrics import MAIN_METRICS  # noqa: F401
from .reporting import fmt as _fmt, markdown_table  # noqa: F401

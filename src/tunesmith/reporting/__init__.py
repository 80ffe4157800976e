"""What the reports of `tunesmith compare` and `tunesmith continual` share: number formats, markdown tables, the
environment the numbers were measured in, plots through matplotlib's Agg backend (no display needed), and a
`Page` written twice: report.md (tables, plots linked) and report.html (page.html.jinja: self-contained, styles
inline, plots embedded as base64 PNGs), next to report.json."""

from __future__ import annotations

import base64
import json
import os
import platform
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path

from .. import runs


def fmt(value, digits: int = 3) -> str:
    """A table cell: a float to `digits` places, an integer with thousands separators, a missing value as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def environment() -> dict:
    """The machine and versions a report's numbers come from (its timings mean nothing without them)."""
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__}


def describe(env: dict) -> str:
    """An `environment()` in a phrase: '2 CPU cores, torch 2.13.0, no GPU'."""
    return f"{env['cpu_count']} CPU cores, torch {env['torch']}, {'CUDA' if env['cuda'] else 'no GPU'}"


def pyplot():
    """matplotlib.pyplot on the Agg backend: plots go to files, no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]  # cells already formatted (`fmt`)
    heading: str | None = None  # a section heading above the table
    labels: int = 1  # how many leading columns name the row: left-aligned on the page, the numbers right


@dataclass
class Page:
    """What a report shows: its title, a one-paragraph intro (markdown: `code` in backticks), its tables, a
    closing note and its plots (caption -> PNG file beside the report)."""

    title: str
    intro: str
    tables: list[Table]
    note: str = ""
    plots: dict[str, Path] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", self.intro, ""]
        for table in self.tables:
            lines += [f"## {table.heading}", ""] if table.heading else []
            lines += [markdown_table(table.header, table.rows), ""]
        lines += [self.note, ""] if self.note else []
        lines += [f"![{caption}]({path.name})" for caption, path in self.plots.items()]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        figures = {caption: base64.b64encode(path.read_bytes()).decode() for caption, path in self.plots.items()}
        return _template().render(page=self, intro=_code_spans(self.intro), figures=figures)


def write_files(out: Path, data: dict, page: Page) -> None:
    """report.json (`data`: everything the report knows), report.md and report.html (`page`) into `out`."""
    (out / runs.REPORT_JSON).write_text(json.dumps(data, indent=2), encoding="utf-8")
    (out / runs.REPORT_MD).write_text(page.markdown(), encoding="utf-8")
    (out / runs.REPORT_HTML).write_text(page.html(), encoding="utf-8")


@cache
def _template():
    from jinja2 import Environment

    text = files(__name__).joinpath("page.html.jinja").read_text(encoding="utf-8")
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.from_string(text)


def _code_spans(text: str):
    """Markdown text as HTML: escaped, its `code` spans as <code> elements."""
    from markupsafe import Markup, escape

    parts = str(escape(text)).split("`")
    return Markup("".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts)))

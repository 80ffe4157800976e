"""The forgetting report of `tunesmith continual`: report.json (everything), report.md (the tables, plots linked)
and report.html (self-contained, plots embedded), in the style of `tunesmith compare`'s report.

Per strategy: the score matrix R[i][j] (task j after step i) under the untrained model's row, and the summaries
of `summary.py`; across strategies one side-by-side table, one heat-map per strategy and one curve per task
(its score after each step, a line per strategy)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..report import _environment, _fmt, embedded_figures, markdown_table
from .summary import summarize

SUMMARIES = [("average_score", "average score"), ("average_forgetting", "average forgetting"),
             ("backward_transfer", "backward transfer"), ("forward_transfer", "forward transfer")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(tasks: list[str], strategies: dict[str, dict], path: Path) -> Path:
    """One heat-map per strategy: rows are 'before' and each step, columns the tasks, cells the score."""
    plt = _pyplot()
    n = len(strategies)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 1.1 * len(tasks) * n, 1.0 + 0.5 * (len(tasks) + 1)), dpi=80,
                             squeeze=False)
    rows = ["before"] + [f"after {t}" for t in tasks]
    for ax, (name, s) in zip(axes[0], strategies.items()):
        grid = [[v if v is not None else float("nan") for v in row] for row in [s["base"], *s["matrix"]]]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "–" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v != v or v < 0.6 else "black")
        ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle("score on each task (columns) after each step (rows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(tasks: list[str], strategies: dict[str, dict], path: Path) -> Path:
    """Per task, its score before training and after each step; one line per strategy."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), dpi=80, squeeze=False)
    steps = ["before", *tasks]
    for j, (ax, task) in enumerate(zip(axes[0], tasks)):
        for n, (name, s) in enumerate(strategies.items()):
            ys = [row[j] if row[j] is not None else float("nan") for row in [s["base"], *s["matrix"]]]
            ax.plot(range(len(steps)), ys, marker="o", color=f"C{n % 10}", label=name)
        ax.axvline(j + 1, color="#999", linestyle=":", linewidth=1)  # the step that trains this task
        ax.set_xticks(range(len(steps)), steps, fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task, fontsize=9)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _summary_table(strategies: dict[str, dict], probe: bool) -> tuple[list[str], list[list[str]]]:
    header = ["strategy", *(label for _, label in SUMMARIES)]
    if probe:
        header += ["probe log-lik (last)", "probe reproduced (last)"]
    rows = []
    for name, s in strategies.items():
        row = [name, *(_fmt(s["summary"][key]) for key, _ in SUMMARIES)]
        if probe:
            last = (s.get("probe") or [{}])[-1]
            row += [_fmt(last.get("mean_logprob")), _fmt(last.get("reproduced"))]
        rows.append(row)
    return header, rows


def _matrix_table(tasks: list[str], s: dict) -> tuple[list[str], list[list[str]]]:
    header = ["after step", *tasks]
    rows = [["before", *(_fmt(v) for v in s["base"])]]
    rows += [[f"{i + 1}. {tasks[i]}", *(_fmt(v) for v in row)] for i, row in enumerate(s["matrix"])]
    return header, rows


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th scope='col'>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(title: str, tasks: list[str], metrics: list[str], strategies: dict[str, dict], out: Path, *,
                 note: str = "") -> dict:
    """strategies: name -> {"base": [T scores], "matrix": T x T scores, optional "probe": per-row dicts,
    optional "steps": per-step details}. Adds each strategy's summaries; writes the three files and the plots
    into `out` and returns report.json's data."""
    out.mkdir(parents=True, exist_ok=True)
    strategies = {name: {**s, "summary": summarize(s["matrix"], s["base"])} for name, s in strategies.items()}
    probe = any(s.get("probe") for s in strategies.values())
    plots = {"scores after each step": plot_heatmaps(tasks, strategies, out / "matrix.png"),
             "per-task curves": plot_curves(tasks, strategies, out / "curves.png")}
    data = {"title": title, "tasks": tasks, "metrics": metrics, "environment": _environment(), "note": note,
            "strategies": strategies, "plots": {k: v.name for k, v in plots.items()}}
    (out / "report.json").write_text(json.dumps(data, indent=2), encoding="utf-8")

    header, rows = _summary_table(strategies, probe)
    env = data["environment"]
    where = f"{env['cpu_count']} CPU cores, torch {env['torch']}, {'CUDA' if env['cuda'] else 'no GPU'}"
    scored = ", ".join(f"{t}: {m}" for t, m in zip(tasks, metrics))
    md = [f"# {title}", "", f"Tasks in order: {scored}. {where}.", "", markdown_table(header, rows), ""]
    for name, s in strategies.items():
        md += [f"## {name}", "", markdown_table(*_matrix_table(tasks, s)), ""]
    md += [note, ""] if note else []
    md += [f"![{k}]({v.name})" for k, v in plots.items()]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    esc = html.escape
    sections = "".join(f"<h2>{esc(name)}</h2>{_html_table(*_matrix_table(tasks, s))}" for name, s in strategies.items())
    images = embedded_figures(plots)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:75em}"
            "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.3em .6em;"
            "text-align:right}td:first-child,th{text-align:left}th{background:#f3f3f3}"
            "figure{display:inline-block;margin:1em}img{max-width:100%}</style></head><body>"
            f"<h1>{esc(title)}</h1><p>Tasks in order: {esc(scored)}. {esc(where)}.</p>"
            f"{_html_table(header, rows)}{sections}<p>{esc(note)}</p>{images}</body></html>")
    (out / "report.html").write_text(page, encoding="utf-8")
    return data

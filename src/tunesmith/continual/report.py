"""The forgetting report of `tunesmith continual`: report.json (everything), report.md and report.html (the page
of reporting/, as `tunesmith compare`'s report).

Per strategy: the score matrix R[i][j] (task j after step i) under the untrained model's row, and the summaries
of `summary.py`; across strategies one side-by-side table, one heat-map per strategy and one curve per task
(its score after each step, a line per strategy)."""

from __future__ import annotations

from pathlib import Path

from ..reporting import Page, Table, describe, environment, fmt, pyplot, write_files
from .summary import summarize

SUMMARIES = [("average_score", "average score"), ("average_forgetting", "average forgetting"),
             ("backward_transfer", "backward transfer"), ("forward_transfer", "forward transfer")]


def plot_heatmaps(tasks: list[str], strategies: dict[str, dict], path: Path) -> Path:
    """One heat-map per strategy: rows are 'before' and each step, columns the tasks, cells the score."""
    plt = pyplot()
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
    plt = pyplot()
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
        row = [name, *(fmt(s["summary"][key]) for key, _ in SUMMARIES)]
        if probe:
            last = (s.get("probe") or [{}])[-1]
            row += [fmt(last.get("mean_logprob")), fmt(last.get("reproduced"))]
        rows.append(row)
    return header, rows


def _matrix_table(tasks: list[str], s: dict) -> tuple[list[str], list[list[str]]]:
    header = ["after step", *tasks]
    rows = [["before", *(fmt(v) for v in s["base"])]]
    rows += [[f"{i + 1}. {tasks[i]}", *(fmt(v) for v in row)] for i, row in enumerate(s["matrix"])]
    return header, rows


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
    data = {"title": title, "tasks": tasks, "metrics": metrics, "environment": environment(), "note": note,
            "strategies": strategies, "plots": {k: v.name for k, v in plots.items()}}
    tables = [Table(*_summary_table(strategies, probe))]
    tables += [Table(*_matrix_table(tasks, s), heading=name) for name, s in strategies.items()]
    scored = ", ".join(f"{t}: {m}" for t, m in zip(tasks, metrics))
    intro = f"Tasks in order: {scored}. {describe(data['environment'])}."
    write_files(out, data, Page(title, intro, tables, note, plots))
    return data

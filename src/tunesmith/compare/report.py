"""The side-by-side report of a comparison: report.json (everything), report.md and report.html (the page of
reporting/), with a bar chart of the headline metrics and the trained entries' loss curves (their log.jsonl)."""

from __future__ import annotations

from pathlib import Path

from .. import runs
from ..metrics import MAIN_METRICS
from ..reporting import Page, Table, describe, environment, fmt, pyplot, write_files

COLUMNS = ["trainable params", "train s", "train ex/s", "total s", "peak RSS MiB"]


def table_rows(results: list[dict], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["entry", "kind", "model", *metrics, *COLUMNS]
    rows = []
    for r in results:
        m = r["metrics"]
        rows.append([r["name"], r["kind"], Path(r["model"]).name, *(fmt(m.get(k)) for k in metrics),
                     fmt(r.get("trainable_parameters")), fmt(r.get("train_seconds"), 0),
                     fmt(r.get("train_examples_per_second"), 1), fmt(r.get("seconds"), 0),
                     fmt(r.get("peak_rss_mib"), 0)])
    return header, rows


def plot_metrics(results: list[dict], metrics: list[str], path: Path) -> Path:
    plt = pyplot()
    names = [r["name"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) * len(metrics) + 1.2), dpi=80)
    height = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        values = [r["metrics"].get(metric) or 0.0 for r in results]
        ys = [i + k * height for i in range(len(names))]
        bars = ax.barh(ys, values, height=height, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_yticks([i + height * (len(metrics) - 1) / 2 for i in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, max((r["metrics"].get(m) or 0) for r in results for m in metrics) * 1.15))
    ax.set_title("metric by method (eval split)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_losses(results: list[dict], path: Path) -> Path | None:
    """Training loss (solid) and eval loss (dashed) by optimizer step, for the entries that trained."""
    plt = pyplot()
    trained = [r for r in results if r.get("log") and Path(r["log"]).exists()]
    if not trained:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=80)
    for n, r in enumerate(trained):
        events = runs.read_log(Path(r["log"]).parent)
        color = f"C{n % 10}"
        train = [(e["step"], e["loss"]) for e in events if "loss" in e]
        evals = [(e["step"], e["eval_loss"]) for e in events if "eval_loss" in e]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{r['name']} train")
        if evals:
            ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", label=f"{r['name']} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training (solid) and eval (dashed) loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


NOTE = ("Peak RSS is the resident-set high-water mark (ru_maxrss) of the process that ran the entry: "
        "{how}. Train s is the training loop's wall time; total s includes loading and scoring. "
        "Every entry is scored on the same eval split under seed {seed}.")


def write_report(cfg, results: list[dict], out: Path) -> dict:
    """report.json, report.md, report.html and the PNG plots into `out`; returns report.json's data."""
    task = cfg.base.get("task", "sft")
    metrics = cfg.metrics or MAIN_METRICS[task]
    plots = {"metric by method": plot_metrics(results, metrics, out / "metrics.png"),
             "loss curves": plot_losses(results, out / "losses.png")}
    plots = {k: v for k, v in plots.items() if v}
    isolated = all(r.get("isolated") for r in results)
    how = ("each entry ran in its own process" if isolated else
           "entries shared one process, so a later entry's value is the maximum so far")
    note = NOTE.format(how=how, seed=cfg.base.get("seed", 42))
    header, rows = table_rows(results, metrics)
    data = {"title": cfg.title, "output_dir": str(out), "task": task, "data": cfg.base.get("data"),
            "seed": cfg.base.get("seed", 42),
            "metrics": metrics, "environment": environment(), "note": note, "table": {"header": header, "rows": rows},
            "entries": results, "plots": {k: v.name for k, v in plots.items()}}
    intro = (f"Task `{task}`, eval data `{(data['data'] or {}).get('eval')}`, seed {data['seed']}, "
             f"{describe(data['environment'])}.")
    write_files(out, data, Page(cfg.title, intro, [Table(header, rows, labels=3)], note, plots))
    return data

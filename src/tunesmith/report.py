"""The side-by-side report of a comparison: report.json (everything), report.md (the table, plots linked)
and report.html (self-contained: styles inline, plots embedded as base64 PNGs), with matplotlib's Agg
backend so no display is needed."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
from pathlib import Path

from .metrics import MAIN_METRICS

COLUMNS = ["trainable params", "train s", "train ex/s", "total s", "peak RSS MiB"]


def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table_rows(results: list[dict], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["entry", "kind", "model", *metrics, *COLUMNS]
    rows = []
    for r in results:
        m = r["metrics"]
        rows.append([r["name"], r["kind"], Path(r["model"]).name, *(_fmt(m.get(k)) for k in metrics),
                     _fmt(r.get("trainable_parameters")), _fmt(r.get("train_seconds"), 0),
                     _fmt(r.get("train_examples_per_second"), 1), _fmt(r.get("seconds"), 0),
                     _fmt(r.get("peak_rss_mib"), 0)])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot_metrics(results: list[dict], metrics: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r.get("log") and Path(r["log"]).exists()]
    if not trained:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=80)
    for n, r in enumerate(trained):
        events = [json.loads(line) for line in Path(r["log"]).read_text().splitlines()]
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


def _environment() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__}


def embedded_figures(plots: dict[str, Path]) -> str:
    """HTML figures with each PNG inline (base64), captioned by its key: the page needs no other file."""
    return "".join(f"<figure><img alt='{html.escape(k)}' src='data:image/png;base64,"
                   f"{base64.b64encode(v.read_bytes()).decode()}'><figcaption>{html.escape(k)}</figcaption></figure>"
                   for k, v in plots.items())


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
            "metrics": metrics, "environment": _environment(), "note": note, "table": {"header": header, "rows": rows},
            "entries": results, "plots": {k: v.name for k, v in plots.items()}}
    (out / "report.json").write_text(json.dumps(data, indent=2), encoding="utf-8")

    env = data["environment"]
    where = f"{env['cpu_count']} CPU cores, torch {env['torch']}, {'CUDA' if env['cuda'] else 'no GPU'}"
    md = [f"# {cfg.title}", "", f"Task `{task}`, eval data `{(data['data'] or {}).get('eval')}`, seed {data['seed']}, "
          f"{where}.", "", markdown_table(header, rows), "", note, ""]
    md += [f"![{k}]({v.name})" for k, v in plots.items()]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    esc = html.escape
    cells = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    images = embedded_figures(plots)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(cfg.title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
            "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
            "td:nth-child(-n+3),th{text-align:left}th{background:#f3f3f3}figure{display:inline-block;margin:1em}"
            "</style></head><body>"
            f"<h1>{esc(cfg.title)}</h1><p>Task <code>{esc(task)}</code>, eval data "
            f"<code>{esc(str((data['data'] or {}).get('eval')))}</code>, seed {data['seed']}, {esc(where)}.</p>"
            f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table><p>{esc(note)}</p>{images}"
            "</body></html>")
    (out / "report.html").write_text(page, encoding="utf-8")
    return data

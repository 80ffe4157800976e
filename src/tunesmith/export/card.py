"""The model card an export carries (README.md): YAML front matter that the Hugging Face hub's card parser reads
(base_model, library_name, tags), and a body saying how the model was made: method, data hashes, chat template
fingerprint, before/after metrics. Written from run.json and metrics.json alone."""

from __future__ import annotations

from pathlib import Path

import yaml

from .. import runs
from ..runs import RunInfo


def write_card(directory: Path, info: RunInfo, *, merged: bool) -> Path:
    """DIR/README.md for the export of `info`'s run (`merged`: adapters merged into standalone weights)."""
    library = "peft" if info.peft and not merged else "transformers"
    files = {split: record for split, record in (info.data or {}).items() if record}
    front = {"base_model": info.base_model, "library_name": library,
             "tags": ["tunesmith", info.method, info.task],
             # the hub's `datasets` key wants hub ids; local files are named by content in the body and here
             "tunesmith_data_sha256": {split: record.get("sha256") for split, record in files.items()}}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {info.path.name}", "",
             f"Fine-tuned from `{info.base_model}` with tunesmith: task {info.task}, method {info.method}"
             f"{' (merged into the weights)' if merged and info.peft else ''}.", "", "## Data", ""]
    lines += [f"- {split}: `{Path(r.get('path', '?')).name}`, {r.get('examples', '?')} examples, "
              f"sha256 `{r.get('sha256')}`" for split, r in files.items()] or ["- not recorded"]
    if info.chat_template_fingerprint:
        lines += ["", f"Chat template fingerprint: `{info.chat_template_fingerprint}`"]
    lines += ["", "## Metrics (eval split)", "", *_metrics_table(runs.read_metrics(info.path))]
    path = directory / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _metrics_table(metrics: dict) -> list[str]:
    """| metric | before | after | for every number in metrics.json's before or after."""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    keys = [k for k in {**before, **after} if _number(before.get(k)) or _number(after.get(k))]
    if not keys:
        return ["Not scored."]
    cell = lambda v: f"{v:.4g}" if _number(v) else "-"  # noqa: E731
    return ["| metric | before | after |", "|---|---|---|",
            *[f"| {k} | {cell(before.get(k))} | {cell(after.get(k))} |" for k in keys]]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

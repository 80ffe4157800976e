"""`tunesmith compare`: one task, one eval split, one seed, several ways to adapt the model (zero-shot,
k-shot, prompt or prefix tuning, LoRA, freeze, full; each with its own overrides), run in turn, then a
side-by-side report (report.py).

    out/
      compare.yaml                  the resolved comparison config
      <entry>/entry.json            the entry's resolved TrainConfig (+ prompting)
      <entry>/run/                  a training entry's run directory (runs.py)
      <entry>/metrics.json, predictions.jsonl, result.json
      <entry>/done                  written last: a re-run skips entries that have it
      report.md, report.html, report.json, *.png

Each entry runs in its own Python process by default (`isolate: true`), so its peak memory is its own
(ru_maxrss of that process) rather than the running maximum of one long-lived process."""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

from pydantic import Field, field_validator

from . import runs
from .config import (ConfigError, PromptingConfig, Strict, TrainConfig, dump_config, load_config, load_document,
                     merge)
from .errors import TunesmithError



class CompareError(TunesmithError, RuntimeError):
    """A comparison that could not finish (an entry failed)."""

class Entry(Strict):
    name: str = Field(description="a short name, also the entry's directory", pattern=r"^[A-Za-z0-9._-]+$")
    prompting: PromptingConfig | None = Field(None, description="set: no training, score by prompting (zero/k-shot)")
    overrides: dict = Field(default_factory=dict, description="TrainConfig keys that differ from `base` "
                                                              "(model, method, learning_rate, ...)")


class CompareConfig(Strict):
    base: dict = Field(description="a TrainConfig mapping shared by every entry: task, data (with the eval "
                                   "split everyone is scored on), seed, ...")
    entries: list[Entry] = Field(min_length=1)
    output_dir: str = Field("runs/compare", description="one subdirectory per entry, plus the report")
    metrics: list[str] | None = Field(None, description="headline metrics (default: per task)")
    isolate: bool = Field(True, description="run each entry in its own process (honest per-entry peak memory)")
    title: str = Field("Comparison", description="report title")

    @field_validator("entries")
    @classmethod
    def _unique(cls, entries):
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"entry names must be unique: {names}")
        for e in entries:
            if "seed" in e.overrides or "data" in e.overrides and "eval" in e.overrides["data"]:
                raise ValueError(f"entry {e.name}: seed and data.eval are shared by every entry; set them in base")
        return entries


def load_compare(source: str | Path | dict) -> CompareConfig:
    """A validated CompareConfig; every entry's TrainConfig is validated too, errors naming the entry."""
    cfg, name = load_document(source, CompareConfig, "comparison config")
    for entry in cfg.entries:
        entry_config(cfg, entry, source=name)
    return cfg


def entry_config(cfg: CompareConfig, entry: Entry, source: str = "config") -> TrainConfig:
    raw = merge(cfg.base, entry.overrides)
    raw = {**raw, "output_dir": str(Path(cfg.output_dir) / entry.name / "run"), "evaluate_before": False}
    try:
        return load_config(raw)
    except ConfigError as err:
        detail = str(err).replace("config: ", "")  # load_config names its dict source "config"
        raise ConfigError(f"{source}: entry {entry.name}: {detail}") from None


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_entry(directory: str | Path) -> dict:
    """Run the entry described by directory/entry.json; write its metrics, predictions, result and `done`."""
    from .evaluation import Evaluation, evaluate, write_results
    from .training import load_splits, train

    directory = Path(directory)
    spec = json.loads((directory / "entry.json").read_text())
    cfg = load_config(spec["config"])
    started = time.perf_counter()
    result = {"name": spec["name"], "kind": "prompting" if spec["prompting"] else cfg.method.name,
              "model": cfg.model, "isolated": spec["isolated"]}
    if spec["prompting"]:
        prompting = PromptingConfig.model_validate(spec["prompting"])
        train_records, eval_records = load_splits(cfg)
        evaluation = evaluate(cfg.model, eval_records[: cfg.eval_limit] if cfg.eval_limit else eval_records,
                              task=cfg.task, prompting=prompting, train_data=train_records, seed=cfg.seed,
                              chat_template=cfg.data.chat_template, max_length=cfg.max_length,
                              params=_params(cfg), output_dir=directory)
        result["kind"] = f"{prompting.shots}-shot" + (" calibrated" if prompting.calibrate else "")
        result.update(trainable_parameters=0, train_seconds=0.0, metrics=evaluation.metrics)
    else:
        run_dir = Path(cfg.output_dir)
        if runs.is_complete(run_dir):  # trained before an interruption; only the bookkeeping was lost
            metrics = runs.read_metrics(run_dir)
        else:
            metrics = train(cfg, resume=bool(runs.complete_checkpoints(run_dir / runs.CHECKPOINTS))).metrics
        t = metrics["train"]
        result.update(trainable_parameters=t["trainable_parameters"], total_parameters=t["total_parameters"],
                      train_seconds=t["wall_seconds"], train_examples_per_second=t.get("train_samples_per_second"),
                      metrics=metrics["after"], log=str(run_dir / runs.LOG))
        write_results(Evaluation(metrics["after"], runs.read_predictions(run_dir)), directory)
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = _peak_mib()
    (directory / "result.json").write_text(json.dumps(result, indent=2))
    (directory / "done").write_text("")
    return result


def _params(cfg: TrainConfig):
    from .generation import SamplingParams

    return SamplingParams(max_new_tokens=cfg.eval_max_new_tokens)


def compare(config: CompareConfig | str | Path | dict, *, log=print) -> dict:
    """Run every entry not yet done, then write the report. Returns the report's data (report.json)."""
    from .report import write_report

    cfg = config if isinstance(config, CompareConfig) else load_compare(config)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.yaml").write_text(dump_config(cfg), encoding="utf-8")
    results = []
    for n, entry in enumerate(cfg.entries, start=1):
        directory = out / entry.name
        if (directory / "done").exists():
            log(f"[{n}/{len(cfg.entries)}] {entry.name}: done before, skipped")
            results.append(json.loads((directory / "result.json").read_text()))
            continue
        log(f"[{n}/{len(cfg.entries)}] {entry.name}: running")
        directory.mkdir(parents=True, exist_ok=True)
        spec = {"name": entry.name, "config": entry_config(cfg, entry).model_dump(mode="json"),
                "prompting": entry.prompting.model_dump(mode="json") if entry.prompting else None,
                "isolated": cfg.isolate}
        (directory / "entry.json").write_text(json.dumps(spec, indent=2))
        if cfg.isolate:
            code = subprocess.call([sys.executable, "-c", _CHILD, str(directory)])
            if code != 0:
                raise CompareError(f"entry {entry.name} failed (exit code {code}; its error is printed above); "
                                   "fix it and re-run (finished entries are skipped)")
            results.append(json.loads((directory / "result.json").read_text()))
        else:
            results.append(run_entry(directory))
    return write_report(cfg, results, out)


# One entry in its own process (not `-m tunesmith.compare`: the package has already imported this module).
_CHILD = "import sys; from tunesmith.compare import _child_main; sys.exit(_child_main(sys.argv[1]))"


def _child_main(directory: str) -> int:
    """Run one isolated entry; a user-facing error is one `tunesmith: error:` line, as in the CLI."""
    logging.basicConfig(level=logging.WARNING, format="tunesmith: %(levelname)s: %(message)s")
    try:
        run_entry(directory)
    except (TunesmithError, OSError) as err:
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # run one entry by hand: python -m tunesmith.compare OUT/ENTRY
    run_entry(sys.argv[1])

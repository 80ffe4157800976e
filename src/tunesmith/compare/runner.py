"""`tunesmith compare CONFIG.yaml`: the entries run in turn, each scored on the shared eval split, then the
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

from .. import runs
from ..config import PromptingConfig, TrainConfig, dump_config, load_config
from ..errors import TunesmithError
from .config import CompareConfig, entry_config, load_compare
from .report import write_report



class CompareError(TunesmithError, RuntimeError):
    """A comparison that could not finish (an entry failed)."""


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_entry(directory: str | Path) -> dict:
    """Run the entry described by directory/entry.json; write its metrics, predictions, result and `done`."""
    from ..evaluation import Evaluation, evaluate, write_results
    from ..training import load_splits, train
    from ..training.data import sft_chat

    directory = Path(directory)
    spec = json.loads((directory / runs.ENTRY).read_text())
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
                              params=_params(cfg), output_dir=directory,
                              **(sft_chat(cfg) if cfg.task == "sft" else {}))
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
    (directory / runs.RESULT).write_text(json.dumps(result, indent=2))
    (directory / runs.DONE).write_text("")
    return result


def _params(cfg: TrainConfig):
    from ..generation import SamplingParams

    return SamplingParams(max_new_tokens=cfg.eval_max_new_tokens)


def run(config: CompareConfig | str | Path | dict, *, overrides: list[str] = (), log=print) -> dict:
    """Run every entry not yet done, then write the report. Returns the report's data (report.json).
    `overrides` are key=value settings of the comparison file."""
    cfg = config if isinstance(config, CompareConfig) else load_compare(config, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / runs.REPORT_CONFIGS["compare"]).write_text(dump_config(cfg), encoding="utf-8")
    results = []
    for n, entry in enumerate(cfg.entries, start=1):
        directory = out / entry.name
        if (directory / runs.DONE).exists():
            log(f"[{n}/{len(cfg.entries)}] {entry.name}: done before, skipped")
            results.append(json.loads((directory / runs.RESULT).read_text()))
            continue
        log(f"[{n}/{len(cfg.entries)}] {entry.name}: running")
        directory.mkdir(parents=True, exist_ok=True)
        spec = {"name": entry.name, "config": entry_config(cfg, entry).model_dump(mode="json"),
                "prompting": entry.prompting.model_dump(mode="json") if entry.prompting else None,
                "isolated": cfg.isolate}
        (directory / runs.ENTRY).write_text(json.dumps(spec, indent=2))
        if cfg.isolate:
            code = subprocess.call([sys.executable, "-c", _CHILD, str(directory)])
            if code != 0:
                raise CompareError(f"entry {entry.name} failed (exit code {code}; its error is printed above); "
                                   "fix it and re-run (finished entries are skipped)")
            results.append(json.loads((directory / runs.RESULT).read_text()))
        else:
            results.append(run_entry(directory))
    return write_report(cfg, results, out)


# One entry in its own process (not `-m tunesmith.compare.runner`: the package has already imported this module).
_CHILD = "import sys; from tunesmith.compare.runner import child_main; sys.exit(child_main(sys.argv[1]))"


def child_main(directory: str) -> int:
    """Run one isolated entry; a user-facing error is one `tunesmith: error:` line, as in the CLI."""
    logging.basicConfig(level=logging.WARNING, format="tunesmith: %(levelname)s: %(message)s")
    try:
        run_entry(directory)
    except (TunesmithError, OSError) as err:
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # run one entry by hand: python -m tunesmith.compare.runner OUT/ENTRY
    run_entry(sys.argv[1])

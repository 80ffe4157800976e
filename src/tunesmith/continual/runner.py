"""`tunesmith continual SEQUENCE.yaml`: learn a sequence of tasks with each strategy, score every task after
every step, and write the forgetting report.

Layout under output_dir: base.json (the untrained model's scores and the probe's reference answers), then per
strategy and step `<strategy>/<i>-<task>/run` (a normal run directory) and `scores.json` beside it, written
last: a step whose scores.json exists is done and is never redone, so an interrupted sequence resumes where it
stopped (a step interrupted mid-training resumes from its last checkpoint)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import runs
from ..config import ConfigError, dump_config
from ..generation import SamplingParams
from ..metrics import main_metric
from .config import ContinualConfig, load_sequence, run_dir, step_config
from .probe import probe_prompts, reference_answers, score_probe
from .report import write_report


class _Scorer:
    """Scores models on every task's held-out split with the sequence's settings."""

    def __init__(self, cfg: ContinualConfig):
        from ..data.formats import read_records
        from ..training.data import sft_chat, sft_records

        first = step_config(cfg, cfg.strategies[0], 0, parent=None)
        self.cfg, self.task, self.template = cfg, first.task, first.data.chat_template
        self.metric = cfg.metric or main_metric(self.task)
        self.params = SamplingParams(max_new_tokens=first.eval_max_new_tokens)
        self.max_length, self.limit = first.max_length, first.eval_limit
        self.chat = sft_chat(first)  # chat_template_kwargs and the reasoning policy, rendered as training does
        # As training sees them: an sft task converted to the sequence's sft_format (a completion-format file
        # learned as chat must be scored as chat, with the chat template, not as raw text).
        self.records = [sft_records(read_records(t.eval), first) if self.task == "sft" else read_records(t.eval)
                        for t in cfg.tasks]

    def score(self, model, tokenizer, j: int, labels=None) -> float:
        from ..evaluation import evaluate

        result = evaluate((model, tokenizer), self.records[j], task=self.task, labels=labels, limit=self.limit,
                          chat_template=self.template, max_length=self.max_length, params=self.params,
                          **(self.chat if self.task == "sft" else {}))
        if self.metric not in result.metrics:
            raise ConfigError(f"metric: {self.metric!r} is not a score of task {self.task}; choose one of "
                              f"{sorted(k for k, v in result.metrics.items() if isinstance(v, float))}")
        return result.metrics[self.metric]

    def probe(self, model, tokenizer, reference) -> dict:
        return score_probe(model, tokenizer, reference, max_new_tokens=self.cfg.probe_max_new_tokens,
                           chat_template=self.template)


def _base(cfg: ContinualConfig, scorer: _Scorer, out: Path, log) -> dict:
    """The untrained model's score on every task and the probe's reference answers (computed once)."""
    path = out / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    from ..models import load_causal_lm, load_tokenizer

    model_name = step_config(cfg, cfg.strategies[0], 0, parent=None).model
    log(f"scoring the untrained model {model_name} on {len(cfg.tasks)} task(s)")
    data = {"model": model_name, "scores": [None] * len(cfg.tasks), "reference": None, "probe": None}
    if scorer.task == "sft":  # a classifier's untrained head has no meaningful score: the row stays empty
        model, tokenizer = load_causal_lm(model_name), load_tokenizer(model_name)
        data["scores"] = [scorer.score(model, tokenizer, j) for j in range(len(cfg.tasks))]
        if cfg.probe:
            data["reference"] = reference_answers(model, tokenizer, max_new_tokens=cfg.probe_max_new_tokens,
                                                  chat_template=scorer.template, prompts=probe_prompts())
            data["probe"] = scorer.probe(model, tokenizer, data["reference"])
    runs.write_json(path, data)
    return data


def _train(config, log):
    """Train a step's run, resuming an interrupted one; a run that finished is reused as it is."""
    from .. import training

    directory = Path(config.output_dir)
    if runs.is_complete(directory):
        log(f"  {directory}: trained before, reused")
        return
    training.train(config, resume=bool(runs.complete_checkpoints(directory / runs.CHECKPOINTS)))


def _key(config) -> str:
    """What a step trains, without where: two steps with equal keys train the same model."""
    raw = config.model_dump(mode="json")
    raw.pop("output_dir")
    return json.dumps(raw, sort_keys=True)


def _step(cfg: ContinualConfig, scorer: _Scorer, base: dict, s: int, i: int, done: list[dict], shared: dict,
          log) -> dict:
    """Train and score step i of strategy s (`done`: its earlier steps). A step that trains exactly what an
    earlier strategy's step trained (the first step of every strategy, usually) reuses that run, and its scores
    when the same models answer."""
    from ..models import load_run

    strategy = cfg.strategies[s]
    own = run_dir(cfg, strategy, i)
    scores_path = own.parent / "scores.json"
    if scores_path.exists():
        log(f"[{strategy.name}] step {i + 1}/{len(cfg.tasks)} ({cfg.tasks[i].name}): done before, skipped")
        data = json.loads(scores_path.read_text())
        shared.setdefault(data["key"], data)
        return data
    log(f"[{strategy.name}] step {i + 1}/{len(cfg.tasks)}: learning {cfg.tasks[i].name}")
    started = time.perf_counter()
    earlier = [d["run"] for d in done]
    config = step_config(cfg, strategy, i, parent=earlier[-1] if earlier else None, replay_from=earlier)
    key = _key(config)
    twin = shared.get(key)
    own.parent.mkdir(parents=True, exist_ok=True)
    if twin:
        directory = Path(twin["run"])
        log(f"  the same training as {directory}: reused")
    else:
        directory = own
        _train(config, log)
    trained = time.perf_counter() - started
    # Which model answers for task j: the latest run; per-task adapters answer with task j's own once trained.
    answering = [str(directory) if strategy.kind == "sequential" or j >= i else earlier[j]
                 for j in range(len(cfg.tasks))]
    if twin and twin["answering"] == answering:
        row, probe = twin["row"], twin["probe"]
    else:
        row, loaded = [], {}
        for j, path in enumerate(answering):
            if path not in loaded:  # one model in memory at a time
                model, tokenizer, _ = load_run(path)
                loaded = {path: (model, tokenizer, runs.open_run(path).labels)}
            model, tokenizer, labels = loaded[path]
            row.append(scorer.score(model, tokenizer, j, labels=labels))
            log(f"  {cfg.tasks[j].name}: {scorer.metric} {row[-1]:.4f}")
        model, tokenizer, _ = loaded.get(str(directory)) or load_run(directory)
        probe = scorer.probe(model, tokenizer, base["reference"]) if base.get("reference") else None
    data = {"task": cfg.tasks[i].name, "run": str(directory), "answering": answering, "row": row, "probe": probe,
            "train_seconds": trained, "seconds": time.perf_counter() - started, "key": key}
    runs.write_json(scores_path, data)  # atomic: a half-written file never marks a step done
    shared.setdefault(key, data)
    return data


def run(config: ContinualConfig | str | Path | dict, *, overrides: list[str] = (), log=print) -> dict:
    """Run every strategy over the task sequence (skipping finished steps), then write the report. Returns the
    report's data (report.json, plus its output_dir). `overrides` are key=value settings of the sequence file."""
    cfg = config if isinstance(config, ContinualConfig) else load_sequence(config, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / runs.REPORT_CONFIGS["continual"]).write_text(dump_config(cfg), encoding="utf-8")
    scorer = _Scorer(cfg)
    base = _base(cfg, scorer, out, log)
    strategies, shared = {}, {}
    for s, strategy in enumerate(cfg.strategies):
        steps = []
        for i in range(len(cfg.tasks)):
            steps.append(_step(cfg, scorer, base, s, i, steps, shared, log))
        strategies[strategy.name] = {
            "kind": strategy.kind, "overrides": strategy.overrides, "base": base["scores"],
            "matrix": [step["row"] for step in steps],
            "probe": [base["probe"], *(step["probe"] for step in steps)] if base.get("probe") else None,
            "steps": [{k: v for k, v in step.items() if k != "key"} for step in steps]}
    note = (f"Each cell is {scorer.metric} on a task's held-out split; 'before' is the untrained "
            f"{base['model']}. The probe scores {len(base['reference'] or [])} everyday prompts against the untrained "
            "model's own greedy answers (mean log-probability per answer token; share reproduced exactly), before "
            "and after each step; its last columns above are after the final step.")
    report = write_report(cfg.title, [t.name for t in cfg.tasks], [scorer.metric] * len(cfg.tasks), strategies,
                          out, note=note)
    return {**report, "output_dir": str(out)}

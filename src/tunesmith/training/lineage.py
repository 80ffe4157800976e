"""Where a run comes from: the data it was trained on (paths and content hashes), the run it continues
(`continue_from`, its lineage chain) and the earlier data it rehearses (`replay`).

run.json records all three, so a later run can continue from it or replay its data knowing only its path:
    "data":    {"train": {"path", "sha256", "examples"}, "eval": {...} | null}
    "parent":  {"path", "task", "method", "base_model"} | null, "lineage": [the parent's lineage..., parent]
    "replay":  {"sources": [...], "pool", "count", "fraction", "seed"} | null"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

from .. import runs
from ..config import ConfigError, TrainConfig, load_config
from ..runs import NotARunError, RunInfo

log = logging.getLogger(__name__)


def file_record(path: str | Path, examples: int) -> dict:
    """{"path" (absolute), "sha256" of the bytes, "examples"} of one data file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(Path(path).resolve()), "sha256": digest.hexdigest(), "examples": examples}


def parent_info(cfg: TrainConfig) -> RunInfo | None:
    """The run `continue_from` names, checked: a finished run of the same task (sft for a preference run) whose
    method this run can go on with (the same PEFT method, or any method on a full/freeze parent's weights)."""
    if not cfg.continue_from:
        return None
    parent = runs.find_run(cfg.continue_from)
    if parent is None:
        raise NotARunError(f"continue_from: {cfg.continue_from} is not a finished tunesmith run (no {runs.RUN_INFO})")
    if parent.task != cfg.model_task:  # a preference run trains (and records) a generation model: sft's
        raise ConfigError(f"continue_from: {cfg.continue_from} is a {parent.task} run; this run's task is {cfg.task}"
                          + (" (it continues sft runs)" if cfg.task == "preference" else ""))
    if parent.peft and parent.method != cfg.method.name:
        raise ConfigError(f"continue_from: {cfg.continue_from} trained a {parent.method} adapter; continuing it "
                          f"needs method.name: {parent.method} (this config says {cfg.method.name})")
    explicit = "model" in cfg.model_fields_set
    if explicit and cfg.model != parent.starts_from and cfg.model != parent.base_model:
        raise ConfigError(f"continue_from: {cfg.continue_from} was trained on {parent.base_model}; leave `model` "
                          f"unset (this config says {cfg.model})")
    return parent


def adapter_method(cfg: TrainConfig, parent: RunInfo | None) -> TrainConfig:
    """`cfg` with a PEFT parent's method settings (r, alpha, target modules, ...): its adapter is trained further as
    it is, so the run's train_config.yaml records what trained, not the method's defaults. Settings the config
    gives that differ from the adapter's are a ConfigError (they cannot apply)."""
    if not (parent and parent.peft and (parent.path / runs.CONFIG).is_file()):
        return cfg
    inherited = load_config(parent.path / runs.CONFIG).method
    given = cfg.method.model_dump(include=cfg.method.model_fields_set - {"name"})
    differ = {key: value for key, value in given.items() if getattr(inherited, key, value) != value}
    if differ:
        key, value = next(iter(differ.items()))
        raise ConfigError(f"method.{key}: {value} cannot apply: continue_from: {cfg.continue_from} trains its "
                          f"{parent.method} adapter further, made with {key} {getattr(inherited, key)} (leave "
                          f"method.{key} unset)")
    return cfg.model_copy(update={"method": inherited})


def parent_labels(parent: RunInfo | None, labels: list[str] | None, source: str) -> list[str] | None:
    """A continued classifier keeps its parent's head: the parent's labels, which must cover the new data's."""
    if not parent or labels is None:
        return labels
    unknown = sorted(set(labels) - set(parent.labels or []))
    if unknown:
        raise ConfigError(f"{source}: labels {unknown} are not among the parent run's {parent.labels}: a "
                          "continued run keeps its parent's head")
    return list(parent.labels)


def load_parent(parent: RunInfo, task: str, labels, tokenizer):
    """The model to train on: a PEFT parent's base with its adapter (and head) attached, trainable; a full
    parent's weights (the method is applied to them afterwards, as to any base)."""
    from ..models import load_for_task

    if not parent.peft:
        return load_for_task(str(parent.path), task, labels, tokenizer=tokenizer)
    import warnings

    from peft import PeftModel

    base = load_for_task(parent.base_model, task, labels, tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return PeftModel.from_pretrained(base, str(parent.path), is_trainable=True)


def lineage(parent: RunInfo | None) -> list[dict]:
    """The chain of runs this one continues, oldest first."""
    return [*parent.lineage, parent.link()] if parent else []


def _source_records(source: str, read) -> tuple[list[dict], list[str]]:
    """(records, the files they came from) of one replay source: a data file, or a run's recorded training data."""
    run = runs.find_run(source)
    if run is None:
        if not Path(source).is_file():
            raise ConfigError(f"replay.from: {source} is neither a data file nor a finished tunesmith run")
        return read(source), [source]
    recorded = run.train_data
    if not recorded:
        raise ConfigError(f"replay.from: the run {source} does not record its training data (trained before "
                          "tunesmith recorded it); give the data file instead")
    path = recorded["path"]
    if not Path(path).is_file():
        raise ConfigError(f"replay.from: the run {source} was trained on {path}, which no longer exists; give "
                          "the data file instead")
    if file_record(path, 0)["sha256"] != recorded["sha256"]:
        log.warning("replay.from: %s changed since the run %s trained on it; replaying its current content",
                    path, source)
    return read(path), [path]


def mix_replay(cfg: TrainConfig, records: list[dict], read) -> tuple[list[dict], dict | None]:
    """(new records + the replayed sample, what was mixed). With `fraction` f the sample is k = round(f n / (1 - f))
    of the n new examples, so replayed examples are the share f of the mix; `count` takes k as given. The sample
    is drawn without replacement from all sources together (with replacement only when k exceeds them), seeded
    by replay.seed or the run's seed."""
    if cfg.replay is None:
        return records, None
    pool, files = [], []
    for source in cfg.replay.sources:
        got, came_from = _source_records(source, read)
        pool += got
        files += came_from
    if not pool:
        raise ConfigError(f"replay.from: {cfg.replay.sources} hold no records")
    n = len(records)
    k = cfg.replay.count if cfg.replay.count is not None else round(cfg.replay.fraction * n / (1 - cfg.replay.fraction))
    seed = cfg.replay.seed if cfg.replay.seed is not None else cfg.seed
    rng = random.Random(seed)
    if k <= len(pool):
        sample = rng.sample(pool, k)
    else:  # more than the sources hold: every record, then a seeded draw for the rest
        sample = pool * (k // len(pool)) + rng.sample(pool, k % len(pool))
    info = {"sources": list(cfg.replay.sources), "files": files, "pool": len(pool), "count": k,
            "fraction": k / (n + k) if n + k else 0.0, "seed": seed}
    log.info("replay: %d of %d earlier examples mixed into %d new ones (%.1f%% of the run)", k, len(pool), n,
             100 * info["fraction"])
    return records + sample, info


"""The sequence file of `tunesmith continual`: the tasks in the order they arrive, the strategies to try on them,
and the training settings they share. Validated like a train config (file:line, did-you-mean), and every step's
TrainConfig is validated before anything trains, errors naming the strategy and the task."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..config import ConfigError, Strict, TrainConfig, load_config, load_document, merge

NAME = r"^[A-Za-z0-9._-]+$"


class TaskSpec(Strict):
    name: str = Field(description="a short name, used in the report and in directory names", pattern=NAME)
    train: str = Field(description="this task's training data")
    eval: str = Field(description="its held-out data: scored after every step")
    overrides: dict = Field(default_factory=dict, description="TrainConfig keys for this task's step only")


class StrategySpec(Strict):
    name: str = Field(description="a short name, also the strategy's directory", pattern=NAME)
    kind: Literal["sequential", "adapters"] = Field(
        "sequential", description="sequential: each step continues from the previous step's run; adapters: each "
                                  "task gets its own fresh adapter on the base (the no-forgetting baseline: "
                                  "task j is scored with its own adapter once trained)")
    overrides: dict = Field(default_factory=dict, description="TrainConfig keys for this strategy, e.g. "
                                                              "replay: {fraction: 0.2} or regularization: {...}")


class ContinualConfig(Strict):
    title: str = Field("Continual learning", description="report title")
    base: dict = Field(description="a TrainConfig mapping shared by every step: model, task, method, ...")
    tasks: list[TaskSpec] = Field(min_length=1, description="in the order they are learned")
    strategies: list[StrategySpec] = Field(min_length=1)
    output_dir: str = Field("runs/continual", description="one subdirectory per strategy, plus the report")
    probe: bool = Field(True, description="score the shipped general-ability probe before and after every step")
    probe_max_new_tokens: int = Field(32, gt=0, description="length of the base model's reference answers")
    metric: str | None = Field(None, description="the score per task (default: exact_match for sft, accuracy "
                                                 "for classify, f1 for ner)")

    @field_validator("tasks", "strategies")
    @classmethod
    def _unique(cls, items):
        names = [i.name for i in items]
        if len(set(names)) != len(names):
            raise ValueError(f"names must be unique: {names}")
        return items


def load_sequence(source: str | Path | dict, overrides: list[str] = ()) -> ContinualConfig:
    """A validated ContinualConfig whose every (strategy, task) step config validates too; `overrides` are
    key=value settings (output_dir=..., base.max_steps=20, ...)."""
    cfg, name = load_document(source, ContinualConfig, "continual config", overrides)
    for strategy in cfg.strategies:
        for i in range(len(cfg.tasks)):
            step_config(cfg, strategy, i, parent=None if i == 0 else "PARENT", source=name)
    return cfg


def step_config(cfg: ContinualConfig, strategy: StrategySpec, i: int, *, parent: str | None,
                replay_from: list[str] = (), source: str = "config") -> TrainConfig:
    """The TrainConfig of step i (task i) of `strategy`: base, then the task's and the strategy's overrides, its
    data, its run directory, continuing from `parent` (sequential strategies) with replay drawn from
    `replay_from` unless the strategy names its own sources."""
    task = cfg.tasks[i]
    raw = merge(merge(cfg.base, task.overrides), strategy.overrides)
    data = {**raw.get("data", {}), "train": task.train, "eval": task.eval}
    raw = {**raw, "data": data, "output_dir": str(run_dir(cfg, strategy, i)), "evaluate_before": False}
    if strategy.kind == "sequential" and i > 0:
        raw["continue_from"] = parent
    else:  # the first step, or a fresh adapter per task: nothing to continue, nothing to replay
        raw.pop("continue_from", None)
        raw.pop("replay", None)
        raw.pop("regularization", None)
    if isinstance(raw.get("replay"), dict) and not raw["replay"].get("from"):
        raw["replay"] = {**raw["replay"], "from": list(replay_from) or ["PARENT"]}
    try:
        return load_config(raw)
    except ConfigError as err:
        detail = str(err).replace("config: ", "")
        raise ConfigError(f"{source}: strategy {strategy.name}, task {task.name}: {detail}") from None


def run_dir(cfg: ContinualConfig, strategy: StrategySpec, i: int) -> Path:
    return Path(cfg.output_dir) / strategy.name / f"{i + 1}-{cfg.tasks[i].name}" / "run"

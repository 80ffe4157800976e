"""The comparison file of `tunesmith compare`: one base TrainConfig (task, data with the shared eval split, seed)
and the entries compared on it, each prompting (zero/k-shot) or training with its own overrides. Validated like a
train config (file:line, did-you-mean), and every entry's TrainConfig is validated before anything runs, errors
naming the entry."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from ..config import ConfigError, PromptingConfig, Strict, TrainConfig, load_config, load_document, merge


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
        return entries

    @model_validator(mode="after")
    def _shared(self):
        """seed and data.eval are the comparison's. An entry of another task holds its own held-out data: a
        preference entry continuing an sft entry has held-out pairs, and is scored on the shared split through the
        run it continues (training/loop.py scores the parent's task after preference tuning)."""
        task = self.base.get("task", "sft")
        for e in self.entries:
            own_eval = "data" in e.overrides and "eval" in e.overrides["data"]
            if "seed" in e.overrides or own_eval and e.overrides.get("task", task) == task:
                raise ValueError(f"entry {e.name}: seed and data.eval are shared by every entry; set them in base")
        return self


def load_compare(source: str | Path | dict, overrides: list[str] = ()) -> CompareConfig:
    """A validated CompareConfig; every entry's TrainConfig is validated too, errors naming the entry.
    `overrides` are key=value settings of the comparison file (output_dir=..., base.max_steps=20, ...)."""
    cfg, name = load_document(source, CompareConfig, "comparison config", overrides)
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

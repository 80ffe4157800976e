"""What a fine-tuning job request means as a training config: `JobRequest`, and `train_config`.

`JobRequest` is the body of POST /v1/fine_tuning/jobs with OpenAI's field names and ranges; `train_config` turns
it into the training config the job's process runs.

Only what the request sets is mapped, so tunesmith's adaptive defaults (training/defaults.py) decide the rest, as
`tunesmith train` would: `n_epochs` -> `epochs`, `batch_size` -> `batch_size`, `seed` -> `seed`,
`learning_rate_multiplier` -> `learning_rate` = the multiplier x the rate the run would otherwise use (the
`tunesmith` field's learning_rate, else the default chosen for the method and the base model's size), and for
`method.type: dpo`, `task: preference` with `preference.objective: dpo` (and `preference.beta`). The `tunesmith`
field is tunesmith's extension: any training config keys (e.g. `{"max_steps": 3, "method": {"name": "lora", "r": 16}}`) but those the
job itself sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...config import ConfigError, TrainConfig, merge, validate

Auto = Literal["auto"]
# Keys of the training config that the job sets from its own fields.
JOB_KEYS = {"model": "model", "output_dir": "the job's directory", "task": "method.type",
            "continue_from": "model"}
JOB_DATA_KEYS = {"train": "training_file", "eval": "validation_file"}


class JobRefused(ValueError):
    """A job request whose training config cannot be built: `param` names the field to fix."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_config"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Hyperparameters(_Body):
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = "auto"


class DpoHyperparameters(Hyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


class Supervised(_Body):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Dpo(_Body):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(_Body):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: dict | None = None


class JobRequest(_Body):
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] | None = None  # no ':' (the name's separator)
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for them (supervised)
    integrations: list | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    tunesmith: dict | None = None  # training config keys (tunesmith's extension)

    def unsupported(self) -> tuple[str, str] | None:
        if self.method is not None and self.method.type == "reinforcement":
            return "method.type", "Reinforcement fine-tuning is not supported here: use supervised (or dpo)."
        if self.integrations:
            return "integrations", ("Integrations (Weights & Biases) are not supported here: the job's events "
                                    "and its run directory's log.jsonl hold its metrics.")
        return None

    @property
    def kind(self) -> str:
        return self.method.type if self.method is not None else "supervised"

    @property
    def settings(self) -> Hyperparameters:
        """The hyperparameters given, wherever they were given (method.<type>, or the older top-level field)."""
        own = getattr(self.method, self.kind, None) if self.method is not None else None
        if own is not None:
            return own.hyperparameters
        return self.hyperparameters or (DpoHyperparameters() if self.kind == "dpo" else Hyperparameters())

    def method_record(self) -> dict:
        """The job's `method` as OpenAI shows it, "auto" where the request said nothing."""
        return {"type": self.kind, self.kind: {"hyperparameters": self.settings.model_dump()}}


def job_override(body: JobRequest) -> dict:
    """The training config keys of the `tunesmith` field; JobRefused when it sets what the job sets."""
    override = dict(body.tunesmith or {})
    for key, field in JOB_KEYS.items():
        if key in override:
            raise JobRefused(f"tunesmith.{key} is set by the job ({field}): remove it from `tunesmith`.",
                             f"tunesmith.{key}")
    data = override.get("data")
    if data is not None and not isinstance(data, dict):
        raise JobRefused("tunesmith.data must be an object of data settings.", "tunesmith.data")
    for key, field in JOB_DATA_KEYS.items():
        if key in (data or {}):
            raise JobRefused(f"tunesmith.data.{key} is set by the job ({field}): remove it from `tunesmith`.",
                             f"tunesmith.data.{key}")
    return override


def train_config(body: JobRequest, *, model: str, train: Path, valid: Path | None, output_dir: Path,
                 chat_template: str | None, parameters) -> dict:
    """The training config (a mapping, validated) of the job `body` asks for: the base `model`, its data files,
    its run directory and, when the server renders chat with another template than the tokenizer's own, that
    template (so the run can be served beside the base). `parameters()` gives the base model's size, asked only
    for learning_rate_multiplier. JobRefused says what is wrong."""
    settings = body.settings
    raw = merge(job_override(body), {"model": model, "output_dir": str(output_dir),
                                  "data": {"train": str(train), **({"eval": str(valid)} if valid else {})}})
    if chat_template and not raw["data"].get("chat_template"):
        raw["data"]["chat_template"] = chat_template
    for key, value in (("epochs", settings.n_epochs), ("batch_size", settings.batch_size), ("seed", body.seed)):
        if value not in ("auto", None):
            raw[key] = value
    if body.kind == "dpo":  # task: preference, preference.objective dpo; OpenAI's beta is the preference's beta
        beta = getattr(settings, "beta", "auto")
        raw["task"] = "preference"
        raw["preference"] = {**raw.get("preference", {}), "objective": "dpo",
                             **({"beta": beta} if beta not in ("auto", None) else {})}
    cfg = _checked(raw)
    if settings.learning_rate_multiplier != "auto":
        raw["learning_rate"] = float(f"{settings.learning_rate_multiplier * _rate(cfg, parameters):.3g}")
        _checked(raw)
    return raw


def _checked(raw: dict) -> TrainConfig:
    try:
        return validate(TrainConfig, raw, "the job's training config")
    except ConfigError as err:
        raise JobRefused(str(err).replace("\n", "; "), "tunesmith") from None


def _rate(cfg: TrainConfig, parameters) -> float:
    """The learning rate the run would use without a multiplier: the config's, else the default chosen for its
    method and the base model's size (defaults.choose; the data's size does not enter the rate)."""
    if cfg.learning_rate is not None:
        return cfg.learning_rate
    from ...training.defaults import choose

    count = parameters()
    if count is None:
        raise JobRefused("learning_rate_multiplier needs the base model's size, which this server's backend does "
                         "not give: set tunesmith.learning_rate instead.", "learning_rate_multiplier")
    chosen = choose(cfg, examples=1, tokens=1, eval_tokens=0, parameters=count, fresh_head=False, budget=None)
    return chosen.values["learning_rate"]

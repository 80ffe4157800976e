"""Typed run configuration: one pydantic model per concern, validated at load time, unknown keys rejected
with a suggestion, `key=value` overrides, and the resolved config saved with every run.

Shipped recipes in examples/ are plain YAML dumps of `TrainConfig`."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.reasoning import Policy
from .data.templates import TemplateKwargs
from .errors import TunesmithError
from .models import DEFAULT_CHAT_MODEL


class ConfigError(TunesmithError, ValueError):
    """A config that cannot be used; the message names the file, the key and (when known) the line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    train: str = Field(description="training data: any format `tunesmith data validate` reads")
    eval: str | None = Field(None, description="held-out data; if unset, `eval_fraction` of train is split off")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="fraction of train held out when `eval` is unset "
                                                               "(seeded split)")
    format: str | None = Field(None, description="input format (default: detected from each file)")
    sft_format: Literal["auto", "chat", "completion"] = Field(
        "auto", description="sft only: train in the data's own format (auto) or convert every record to chat "
                            "or completion")
    text_column: str = Field("text", description="CSV/TSV text column")
    label_column: str = Field("label", description="CSV/TSV label column")
    chat_template: str | None = Field(None, description="a named fallback (chatml, llama3, plain) or a Jinja "
                                                        "template; default: the tokenizer's own")
    chat_template_kwargs: TemplateKwargs | None = Field(
        None, description="sft and preference: extra chat template variables, e.g. {enable_thinking: false} (Qwen3, SmolLM3: "
                          "train without thinking); recorded in run.json and applied wherever the run renders chat: "
                          "eval, generate, chat, serve")
    reasoning: Policy = Field(
        "auto", description="sft and preference: assistant reasoning_content in chat data: auto = as the chat template prints "
                            "it (Qwen3's: in <think> for the turns after the last user message), train = learned in "
                            "every learnable turn (an error where the template drops it), drop = removed")


# --- methods: what trains. One class per method, discriminated by `name`. ---------------------------------

class FullMethod(Strict):
    name: Literal["full"]


class FreezeMethod(Strict):
    name: Literal["freeze"]
    train_layers: int = Field(2, ge=0, description="train only the top k transformer blocks")
    train_head: bool = Field(True, description="also train the output head (LM head or classifier)")


class LoraMethod(Strict):
    name: Literal["lora"]
    r: int = Field(8, gt=0, description="rank of the update matrices")
    alpha: float = Field(16, gt=0, description="scaling numerator (alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input (0.05 costs ~17% of a CPU step)")
    target_modules: Union[str, list[str]] = Field("all-linear", description="modules to adapt")
    dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")


class AdaLoraMethod(Strict):
    name: Literal["adalora"]
    init_r: int = Field(12, gt=0, description="starting rank of every adapted matrix")
    target_r: int = Field(4, gt=0, description="average rank after budget reallocation")
    tinit: int | None = Field(None, ge=0, description="warm-up steps before pruning (default: 10% of steps)")
    tfinal: int | None = Field(None, ge=0, description="final steps with fixed ranks (default: 20% of steps)")
    delta_t: int = Field(1, gt=0, description="steps between two budget allocations")
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[str, list[str]] = Field("all-linear")
    orth_reg_weight: float = Field(0.5, ge=0, description="orthogonality regulariser weight")


class IA3Method(Strict):
    name: Literal["ia3"]
    target_modules: Union[str, list[str], None] = Field(None, description="default: peft's per-architecture choice")
    feedforward_modules: Union[str, list[str], None] = Field(None)


class PrefixMethod(Strict):
    name: Literal["prefix"]
    num_virtual_tokens: int = Field(20, gt=0, description="prefix length in every layer's keys and values")
    projection: bool = Field(False, description="reparameterise the prefix through an MLP")


class PromptMethod(Strict):
    name: Literal["prompt"]
    num_virtual_tokens: int = Field(20, gt=0, description="soft prompt length")
    init_text: str | None = Field(None, description="initialise the soft prompt from this text's embeddings")


Method = Annotated[Union[FullMethod, FreezeMethod, LoraMethod, AdaLoraMethod, IA3Method, PrefixMethod,
                         PromptMethod], Field(discriminator="name")]
METHOD_NAMES = tuple(cls.model_fields["name"].annotation.__args__[0] for cls in Method.__origin__.__args__)
PEFT_METHODS = tuple(name for name in METHOD_NAMES if name not in ("full", "freeze"))


class EarlyStopping(Strict):
    metric: str = Field("eval_loss", description="metric to watch (eval_loss, eval_accuracy, eval_f1, ...)")
    patience: int = Field(3, gt=0, description="evaluations without improvement before stopping")
    greater_is_better: bool | None = Field(None, description="default: False for *loss, else True")


class ReplayConfig(Strict):
    """Rehearsal: a seeded sample of earlier training data mixed into this run's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              serialize_by_alias=True)
    from_: Union[str, list[str]] = Field(alias="from", description="data files, or earlier runs whose recorded "
                                                                   "training data is used (one path or a list)")
    fraction: float | None = Field(None, gt=0, lt=1, description="share of this run's training examples that are "
                                                                 "replayed (k / (new + k))")
    count: int | None = Field(None, gt=0, description="replay exactly this many examples instead of a fraction")
    seed: int | None = Field(None, description="sampling seed (default: the run's seed)")

    @model_validator(mode="after")
    def _one_size(self):
        if (self.fraction is None) == (self.count is None):
            raise ValueError("replay needs exactly one of fraction (e.g. 0.2) or count")
        return self

    @property
    def sources(self) -> list[str]:
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)


class RegularizationConfig(Strict):
    """Pull the trainable weights toward the parent run's (needs continue_from)."""

    kind: Literal["l2sp", "ewc"] = Field("l2sp", description="l2sp: strength * sum (w - w_parent)^2 (Li et al. "
                                                             "2018); ewc: each term weighted by the parent data's "
                                                             "diagonal Fisher (Kirkpatrick et al. 2017)")
    strength: float = Field(gt=0, description="the penalty's weight (lambda) added to the loss")
    fisher_samples: int = Field(64, gt=0, description="ewc: examples of the parent's data for the Fisher estimate")


class PromptingConfig(Strict):
    """Prompting without training: zero- or k-shot, through the language model. For classify, each label is
    scored by the log-likelihood of its label words after the prompt (no free generation)."""

    template: str = Field("{{ text }}", description="Jinja2 for the query; fields come from the record, plus "
                                                    "`labels` (the label names, comma-separated)")
    instruction: str = Field("", description="text before the shots and the query (the system message in chat "
                                             "format); may use `labels`")
    format: Literal["chat", "completion"] = Field("chat", description="lay the prompt out as chat messages "
                                                                      "(chat models) or as plain text")
    verbalizer: dict[str, Union[str, list[str]]] | None = Field(
        None, description="classify: label -> label word(s) scored after the prompt (default: the label's own "
                          "name); a label's score is the log of the summed probability of its words")
    shots: int = Field(0, ge=0, description="exemplars from the training data shown before each query")
    shot_strategy: Literal["first", "random"] = Field("random", description="which exemplars (seeded)")
    calibrate: bool = Field(False, description="classify: contextual calibration (Zhao et al. 2021): divide "
                                               "by the label probabilities given content-free inputs")
    calibration_inputs: list[str] = Field(["N/A", "", "[MASK]"], description="content-free inputs, averaged")


# TRL's DPO loss types that work on summed reply log-probabilities and a precomputed reference alone (the others
# need more than that: per-token terms, sorted batches, or a label smoothing to be set).
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "sigmoid_norm", "bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down")


class PreferenceConfig(Strict):
    """How task: preference learns from preferences (training/preference.py; the losses are TRL's)."""

    objective: Literal["dpo", "orpo", "simpo", "kto"] = Field(
        "dpo", description="dpo (Rafailov et al. 2023: pairs, against a frozen reference: the run continued, or the "
                           "base), orpo (Hong et al. 2024: pairs, no reference, an SFT term built in: from a base "
                           "model), simpo (Meng et al. 2024: pairs, no reference, length-normalised), kto "
                           "(Ethayarajh et al. 2024: single replies marked good or bad, against a reference)")
    beta: float | None = Field(None, gt=0, description="dpo, kto: how far from the reference the policy may move "
                                                       "(higher: less); orpo: lambda, the odds-ratio term's weight; "
                                                       "simpo: the reward scale (default: per objective)")
    loss_type: Literal[DPO_LOSSES] = Field("sigmoid", description="dpo: TRL's loss_type (sigmoid: DPO; ipo, hinge, "
                                                                  "... its variants)")
    sft_weight: float | None = Field(None, ge=0, description="dpo: weight of an SFT term on the chosen replies "
                                                             "beside the preference loss (TRL's loss_type sft; RPO, "
                                                             "Pang et al. 2024): keeps the task the run learned "
                                                             "(default: 1 for dpo; 0 turns it off)")
    simpo_gamma: float = Field(1.0, ge=0, description="simpo: the target reward margin gamma (SimPO's gamma / "
                                                      "beta = 0.5 at beta 2)")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the good replies' loss (raise it when "
                                                           "they are fewer than the bad ones)")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the bad replies' loss")


def bf16_lowerable(method) -> bool:
    """Whether `precision: bf16` applies to a method: LoRA's frozen base layers (not DoRA's, which it reads)."""
    return method.name == "lora" and not getattr(method, "dora", False)


class TrainConfig(Strict):
    model: str = Field(DEFAULT_CHAT_MODEL, description="embedded name, directory or hub id")
    task: Literal["sft", "classify", "ner", "preference"] = Field(
        "sft", description="generation (sft), sequence classification, token classification, or preference tuning "
                           "of a generation model (DPO, ORPO, SimPO, KTO: see `preference`)")
    data: DataConfig
    method: Method = Field(default_factory=lambda: LoraMethod(name="lora"))
    output_dir: str = Field("runs/run", description="run directory; never overwritten (use --resume to continue)")

    # Unset (None) learning_rate, epochs, warmup_ratio and eval_steps are chosen per run by training/defaults.py;
    # the run's saved train_config.yaml holds the values chosen.
    learning_rate: float | None = Field(None, gt=0, description="default: chosen from the method, the model's "
                                                                "size and the task")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (ignored when "
                                                         "max_steps > 0; default: from the data's size)")
    max_steps: int = Field(-1, description="optimizer steps; overrides epochs when > 0")
    batch_size: int = Field(8, gt=0, description="examples (or packed rows) per device per step")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="default: 0.1, at most 100 steps")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_length: int = Field(512, gt=0, description="tokens per example; longer ones are truncated (counted)")
    packing: bool = Field(False, description="sft: pack short examples into rows of max_length tokens")
    group_by_length: bool = Field(True, description="batch examples of similar length together (less padding); "
                                                    "the batches' order stays random")
    share_prefix: bool = Field(True, description="sft: when a batch's examples begin with the same tokens (a system "
                                                 "prompt, tool definitions), compute them once per batch, not once "
                                                 "per example; preference: each prompt once for its chosen and "
                                                 "rejected replies, and a prefix several pairs share once, in "
                                                 "training and scoring (same losses and gradients)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="LoRA: keep the frozen base weights in bf16 (auto: where the CPU/GPU multiplies bf16 "
                            "natively); the adapter, activations and loss stay fp32")
    recompute: bool | None = Field(
        None, description="recompute activations in the backward pass instead of keeping them (activation "
                          "checkpointing): much less memory for one more forward pass (default: on when the "
                          "activations would outweigh the model's weights or take over a quarter of the free "
                          "memory)")
    seed: int = 42

    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps (default with an eval split: "
                                                           "up to 5 times a run); the run ends with the best "
                                                           "checkpoint")
    early_stopping: EarlyStopping | None = None
    save_steps: int = Field(50, gt=0, description="checkpoint every N steps (unset, with an eval split: at every "
                                                  "evaluation)")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept (the best one is kept too)")
    logging_steps: int = Field(5, gt=0)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers that log the run (tensorboard, mlflow, wandb; one or "
                                          "a list; default none): TensorBoard writes to RUN/tensorboard, MLflow to "
                                          "MLFLOW_TRACKING_URI, wandb offline unless WANDB_MODE "
                                          "says otherwise")
    run_name: str | None = Field(None, description="the run's name in the trackers (default: the run directory's)")

    evaluate_before: bool = Field(True, description="score the untrained base model on the eval split first")
    eval_max_new_tokens: int = Field(64, gt=0, description="sft: generation length when scoring replies")
    eval_limit: int | None = Field(None, gt=0, description="score at most this many eval examples")
    prompting: PromptingConfig | None = Field(
        None, description="classify with a causal-LM base: score the 'before' through the language model "
                          "(zero/k-shot with verbalizers) instead of the untrained head")

    continue_from: str | None = Field(None, description="a finished run to continue on new data: its weights (full "
                                                        "model, or adapter and head) are where training starts; "
                                                        "`model` is taken from it")
    replay: ReplayConfig | None = Field(None, description="rehearsal: mix a seeded sample of earlier data in")
    regularization: RegularizationConfig | None = Field(None, description="pull the weights toward the parent "
                                                                          "run's (needs continue_from)")
    preference: PreferenceConfig | None = Field(None, description="task: preference: the objective and its "
                                                                  "settings (default: dpo)")

    @property
    def model_task(self) -> str:
        """What the trained model does, as run.json records it: preference tuning trains a generation (sft) model,
        which every command then loads, serves and exports as one."""
        return "sft" if self.task == "preference" else self.task

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value):
        """`report_to: tensorboard` is shorthand for a list of one; `none` (transformers' word) for none."""
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self):
        if self.regularization and not self.continue_from:
            raise ValueError("regularization pulls toward a parent run's weights: set continue_from too")
        if self.early_stopping and not self.eval_steps:
            raise ValueError("early_stopping needs eval_steps (how often to evaluate)")
        if self.precision == "bf16" and not bf16_lowerable(self.method):
            raise ValueError(f"precision: bf16 keeps a frozen LoRA base in bf16; {self.method.name} "
                             f"{'(DoRA) ' if self.method.name == 'lora' else ''}trains or reads the base weights: "
                             "use precision: fp32 or auto")
        if self.packing and self.task != "sft":
            raise ValueError("packing only applies to task: sft")
        if self.packing and self.method.name in ("prefix", "prompt"):
            # peft drops (prompt) or shifts (prefix, which also adds a KV cache) the position ids that keep packed
            # examples apart, so every example would silently attend to the ones packed before it.
            raise ValueError(f"packing does not work with {self.method.name} tuning; set packing: false")
        if self.task == "ner" and self.method.name == "prefix":
            raise ValueError("prefix tuning is not supported for ner by peft; use prompt or lora")
        return self._check_preference()

    def _check_preference(self):
        if self.task != "preference":
            if self.preference is not None:
                raise ValueError("preference settings apply to task: preference only")
            return self
        if self.preference is None:
            self.preference = PreferenceConfig()
        if self.method.name in ("prompt", "prefix"):
            # they change the sequence the model sees, so reply log-probabilities sit elsewhere (as for loss.py)
            raise ValueError(f"task: preference trains through the model's own forward; {self.method.name} tuning "
                             "is not supported (use lora)")
        if self.regularization is not None:
            raise ValueError("regularization does not apply to task: preference: dpo and kto already keep the run "
                             "near its reference (raise preference.beta to keep it nearer)")
        return self


# ---------------------------------------------------------------------------------------------------------
# loading, overrides, saving
# ---------------------------------------------------------------------------------------------------------

def _line_map(text: str) -> dict[tuple, int]:
    """1-based line of every key path in a YAML document, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _known_keys(model: type[BaseModel], path: tuple, raw: dict) -> list[str]:
    """Field names valid at `path` (for 'did you mean' suggestions); under `method`, those of the named method."""
    if model is TrainConfig and path == ("method",):
        name = (raw.get("method") or {}).get("name") if isinstance(raw.get("method"), dict) else None
        methods = dict(zip(METHOD_NAMES, Method.__origin__.__args__))
        if name in methods:
            return [k for k in methods[name].model_fields if k != "name"] + ["name"]
    fields = model.model_fields
    for part in path:
        if part not in fields:
            return []
        annotation = fields[part].annotation
        subs = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)
                and issubclass(a, BaseModel)]
        if not subs:
            return []
        fields = {v.alias or k: v for sub in subs for k, v in sub.model_fields.items()}  # as the user spells it
    return list(fields)


def _explain(err: ValidationError, source: str, lines: dict[tuple, int], raw: dict,
             model: type[BaseModel] = None) -> str:
    model = model or TrainConfig
    out = []
    for e in err.errors():
        # A discriminated union puts the method's name into the error location: method.lora.r -> method.r
        loc = tuple(str(p) for i, p in enumerate(e["loc"]) if not (i == 1 and e["loc"][0] == "method"
                                                                     and p in METHOD_NAMES))
        key = ".".join(loc) or "(top level)"
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            known = _known_keys(model, loc[:-1], raw)
            guess = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else (f"; known keys: {', '.join(known)}" if known else "")
            out.append(f"{where}: {key}: unknown key{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append(f"{where}: {key}: {msg}")
    return "\n".join(out)


def read_yaml(path: str | Path, what: str = "config") -> tuple[dict, dict[tuple, int]]:
    """The mapping in a YAML file and the 1-based line of every key path in it. Every YAML file tunesmith
    reads goes through here, so a syntax error or a wrong shape is a `file:line` ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); a {what} is YAML text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML: "
                          f"{getattr(err, 'problem', None) or err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of keys to values, not a {type(raw).__name__}")
    return raw, _line_map(text)


def validate(model: type[BaseModel], raw: dict, source: str = "config", lines: dict[tuple, int] | None = None):
    """`model` validated from `raw`; every problem becomes one `source:line: key: message` line of a ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, not a {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, source, lines or {}, raw, model)) from None


def load_document(source: str | Path | dict, model: type[BaseModel], what: str, overrides: list[str] = ()):
    """(validated `model`, the source's name for messages) of a YAML file or a mapping, with `key=value`
    overrides merged in (errors then name the merged mapping, not the file's lines)."""
    if overrides:
        raw = source if isinstance(source, dict) else read_yaml(source, what)[0]
        source = merge(raw, parse_overrides(list(overrides)))
    if isinstance(source, dict):
        return validate(model, source, "config", {}), "config"
    raw, lines = read_yaml(source, what)
    return validate(model, raw, str(source), lines), str(source)


def load_prompting(source: str | Path | dict, **overrides) -> PromptingConfig:
    """A validated PromptingConfig from a YAML file (or a dict), with keyword overrides (None = keep)."""
    if isinstance(source, dict):
        raw, name, lines = dict(source), "prompting", {}
    else:
        (raw, lines), name = read_yaml(source, "prompting config"), str(source)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return validate(PromptingConfig, raw, name, lines)


def parse_overrides(overrides: list[str]) -> dict:
    """['method.r=16', 'data.train=x.jsonl'] -> nested dict; values are parsed as YAML (numbers, bools, lists)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. learning_rate=1e-4 or method.r=16)")
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value) if value else ""
    return nested


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, mapping into mapping at every depth (a new dict; neither argument changes)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(source: str | Path | dict, overrides: list[str] = ()) -> TrainConfig:
    """A validated TrainConfig from a YAML file (or a dict), with `key=value` overrides applied."""
    if isinstance(source, dict):
        raw, name, lines = source, "config", {}
    else:
        (raw, lines), name = read_yaml(source, "config"), str(source)
    raw = merge(raw, parse_overrides(list(overrides)))
    if isinstance(raw.get("method"), str):  # `method: lora` is shorthand for `method: {name: lora}`
        raw["method"] = {"name": raw["method"]}
    return validate(TrainConfig, raw, name, lines)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(dump_config(config), encoding="utf-8")

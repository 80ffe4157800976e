"""The one training loop, for every task and method, on transformers' `Trainer`.

`train(config)` reads as its phases: the data read, checked and tokenized (data.py, lineage.py's replay), the
base model (or the parent run) loaded for the task, what the config leaves unset chosen (defaults.py), the base
model scored on the eval split (preference tuning: the run it starts from scored once, its log-probabilities the
frozen reference: preference.py), the method applied (methods.py) and the Trainer built (callbacks.py), frozen
weights lowered to bf16 (precision.py), training with atomic checkpoints that `--resume` picks up, then a
self-describing run directory written (its format: runs.py), run.json last."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import EarlyStoppingCallback, ProgressCallback, TrainingArguments, set_seed

from .. import runs
from ..config import PEFT_METHODS, TrainConfig, load_config, save_config
from ..errors import TunesmithError
from ..data.packing import pack, shared_prefix, shared_tokens
from ..data.templates import chat_template_for, template_fingerprint
from ..data.tokenize import TokenizeStats
from ..evaluation import score
from ..generation import SamplingParams
from ..methods import prepare, trainable_parameters
from ..models import EMBEDDED, is_causal_lm, load_causal_lm, load_for_task, load_tokenizer, resolve
from ..runs import RunError, RunInfo
from ..version import __version__
from . import lineage, precision, tracking
from .callbacks import AdaLora, JsonlLog, Progress, RunTrainer, eval_metrics_fn
from .data import (build_features, check_kind, check_trainable, collator, feature_tokens, label_list, load_splits,
                   read_data, sft_chat, sft_records, shares_prefix, tool_rendering)
from .defaults import CPU_BUDGET, Chosen, Speed, best_checkpoint, resolve as resolve_defaults
from .loss import supports_labelled_only
from .preference import PreferenceTrainer, configure, held_out, reference_pass
from .regularize import anchor_for
from .speed import time_one_step

log = logging.getLogger(__name__)
# peft checkpoints neither AdaLoRA's importance scores nor loads an adapter already cut to its rank pattern.
_NO_ADALORA_RESUME = "AdaLoRA runs cannot be resumed (peft does not checkpoint the rank budget); start a new run"


@dataclass
class Run:
    path: Path
    metrics: dict


@dataclass(frozen=True)
class _Data:
    """A run's data, ready: the records (scored before and after training), the features the Trainer sees, and
    what run.json records of where they came from."""

    train_records: list[dict]  # the train split, replayed records mixed in
    eval_records: list[dict]
    labels: list[str] | None  # classify/ner: the head's labels, in order
    train_features: list[dict]  # packed into rows when cfg.packing
    eval_features: list[dict]
    stats: TokenizeStats | None  # the train split's tokenization (sft)
    template: str | None  # the chat template the sft data is rendered with; the run carries it
    tools: dict | None  # run.json's "tools": how the template rendered the data's tools (None: no tool data)
    files: dict  # run.json's "data": {"train": file_record, "eval": file_record | None}
    replay: dict | None  # run.json's "replay"


@dataclass(frozen=True)
class _Fit:
    metrics: dict  # the Trainer's; train_loss averages every step, across resumes
    wall: float  # seconds in trainer.train


def train(config: TrainConfig | str | Path | dict, overrides: list[str] = (), *, resume: bool = False,
          labelled_only: bool = True) -> Run:
    """Train as configured and return the run (its directory and metrics). See the module docstring.
    `labelled_only=False` computes the sft loss the plain way, logits at every position (equal results; for
    benchmarks and tests of loss.py)."""
    cfg, parent = _start(config, overrides, resume)
    tracking.check(cfg.report_to)  # a missing tracker package fails now, not after the "before" scoring
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = _load_data(cfg, tokenizer, parent)
    model = _load_model(cfg, parent, data.labels, tokenizer)
    planned, timed, sizes = cfg, _plans_by_speed(cfg), _sizes(cfg, data, model, parent)
    cfg, chosen = _resolve_defaults(cfg, sizes, show=not timed)  # planned again once a step is timed, if `timed`
    metrics = {}
    if cfg.evaluate_before and _is_main() and cfg.task != "preference":
        metrics["before"] = _score_before(cfg, model, tokenizer, data, parent)
    # The method's fresh weights (LoRA, heads) start from the run's seed, whatever scoring "before" drew.
    set_seed(cfg.seed)
    model = _apply_method(cfg, model, parent, chosen.total_steps)
    parameters = trainable_parameters(model)  # (trainable, total)
    trainer = _build_trainer(cfg, model, tokenizer, data, parent, labelled_only)
    cfg, lowered = _lower_precision(cfg, trainer, chosen)
    reference, spent = _reference(cfg, trainer, tokenizer, data, parent, metrics) if cfg.task == "preference" \
        else (None, 0.0)
    if timed:
        cfg, chosen = _plan_by_speed(planned, cfg, chosen, trainer, data, sizes, spent)
    fit = _fit(cfg, trainer, resume)
    if lowered:  # the base's own fp32 weights back: the run is saved and scored as a user will load it
        precision.restore_frozen_linears(trainer.model, lowered,
                                         load_for_task(cfg.model, cfg.model_task, data.labels, tokenizer=tokenizer))
    if trainer.is_world_process_zero():
        _save_model(cfg, trainer, tokenizer, data.template)
        metrics["train"] = _train_metrics(fit, trainer, parameters, data)
        metrics["after"] = _score_after(cfg, trainer.model, tokenizer, data, parent, reference)
        _save_run(cfg, data, parent, chosen, metrics)
        tracking.log_summary(trainer, tracking.summary(metrics, chosen.reasons))
    return Run(Path(cfg.output_dir), metrics)


# ---------------------------------------------------------------------------------------------------------
# the phases, in order
# ---------------------------------------------------------------------------------------------------------

def _start(config, overrides, resume: bool) -> tuple[TrainConfig, RunInfo | None]:
    """The config, the run it continues (if any), and its output directory claimed."""
    cfg = config if isinstance(config, TrainConfig) else load_config(config, list(overrides))
    parent = lineage.parent_info(cfg)
    if parent:  # the parent's base (or, for a full parent, its weights) is where this run starts
        cfg = lineage.adapter_method(cfg.model_copy(update={"model": parent.starts_from}), parent)
    run_dir = Path(cfg.output_dir)
    if resume and cfg.method.name == "adalora":
        raise RunError(f"{run_dir}: {_NO_ADALORA_RESUME}")
    if _is_main():  # other ranks would see rank 0's first files and refuse the directory
        runs.claim(run_dir, resume)
    return cfg, parent


def _load_data(cfg: TrainConfig, tokenizer, parent: RunInfo | None) -> _Data:
    """The splits, replayed records mixed in, checked against the task; the labels; the features, packed."""
    train_records, eval_records = load_splits(cfg)
    files = {"train": lineage.file_record(cfg.data.train, len(train_records)),
             "eval": lineage.file_record(cfg.data.eval, len(eval_records)) if cfg.data.eval else None}
    train_records, replay = lineage.mix_replay(cfg, train_records, lambda path: read_data(path, cfg))
    check_kind(train_records, cfg, cfg.data.train)
    if eval_records:
        check_kind(eval_records, cfg, cfg.data.eval or cfg.data.train)
    labels = label_list(train_records, cfg.task) if cfg.model_task != "sft" else None
    labels = lineage.parent_labels(parent, labels, cfg.data.train)
    train_features, stats = build_features(cfg, tokenizer, train_records, labels, cfg.data.train)
    check_trainable(train_features, stats, cfg, cfg.data.train)
    eval_features, _ = build_features(cfg, tokenizer, eval_records, labels, cfg.data.eval or "eval split") \
        if eval_records else ([], None)
    if cfg.packing:
        train_features = pack(train_features, cfg.max_length)
        eval_features = pack(eval_features, cfg.max_length) if eval_features else []
    template = chat_template_for(tokenizer, cfg.data.chat_template) if cfg.model_task == "sft" else None
    tools = tool_rendering(_as_sft(train_records, cfg), template) if cfg.model_task == "sft" else None
    return _Data(train_records, eval_records, labels, train_features, eval_features, stats, template, tools, files,
                 replay)


def _load_model(cfg: TrainConfig, parent: RunInfo | None, labels, tokenizer):
    if parent:
        model = lineage.load_parent(parent, cfg.model_task, labels, tokenizer)
    else:
        model = load_for_task(cfg.model, cfg.model_task, labels, tokenizer=tokenizer)
    model.config.use_cache = False  # a KV cache during training also hides packed-sequence boundaries
    return model


def _plans_by_speed(cfg: TrainConfig) -> bool:
    """Whether the default plan is bounded by a step timed on this machine: on a CPU, with epochs left to the
    defaults, in one process (several would each plan from their own timing), not AdaLoRA (its schedule is fixed
    when the method is applied, before a step can be timed)."""
    return (not _cuda() and cfg.epochs is None and cfg.max_steps <= 0 and _world_size() == 1
            and cfg.method.name != "adalora")


def _sizes(cfg: TrainConfig, data: _Data, model, parent: RunInfo | None) -> dict:
    """What the defaults are chosen from (defaults.choose's keywords): the data's and the base model's size."""
    tokens = _epoch_tokens(cfg, data.train_features, share=False)
    eval_tokens = _epoch_tokens(cfg, data.eval_features, share=False)
    if shares_prefix(cfg, model):  # what an epoch costs: what a batch's rows share is computed once per batch
        shared = _epoch_tokens(cfg, data.train_features, share=True)
        if shared < tokens and _is_main():
            what = ("the tokens a batch's replies begin with alike (a pair's prompt, a system prompt) are computed "
                    "once per batch" if cfg.task == "preference" else
                    f"the {shared_prefix(data.train_features)} tokens every example begins with are computed once "
                    "per batch")
            print(f"batches: {what} (share_prefix): an epoch costs {shared} tokens, not {tokens}", file=sys.stderr)
        tokens = shared
        eval_tokens = _epoch_tokens(cfg, data.eval_features, share=True)
    return dict(examples=len(data.train_features), tokens=tokens, eval_tokens=eval_tokens,
                parameters=sum(p.numel() for p in model.parameters()), fresh_head=cfg.model_task != "sft" and not parent,
                world_size=_world_size(), budget=None if _cuda() else CPU_BUDGET)


def _epoch_tokens(cfg: TrainConfig, features: list[dict], *, share: bool) -> int:
    """The tokens an epoch of `features` costs: every feature's, or with share_prefix (training/data.shares_prefix)
    what a batch's rows share once. The timed step (_plan_by_speed) is counted the same way, so the plan's tokens/s
    and an epoch's tokens are in one unit."""
    if not share:
        return sum(feature_tokens(f) for f in features)
    if cfg.task == "preference":
        from .preference_data import epoch_tokens

        return epoch_tokens(features, cfg.batch_size)
    return shared_tokens(features, cfg.batch_size)


def _resolve_defaults(cfg: TrainConfig, sizes: dict, *, show: bool = True,
                      speed: Speed | None = None) -> tuple[TrainConfig, Chosen]:
    """What the config leaves unset, chosen from `sizes` (and `speed`, a step timed on this CPU); `show`: print
    the reasons. The run saves the values."""
    cfg, chosen = resolve_defaults(cfg, **sizes, speed=speed)
    if show:
        _print_defaults(chosen.reasons)
    return cfg, chosen


def _plan_by_speed(planned: TrainConfig, cfg: TrainConfig, chosen: Chosen, trainer: RunTrainer, data: _Data,
                   sizes: dict, spent: float) -> tuple[TrainConfig, Chosen]:
    """The defaults chosen again with one step of this run timed on this machine (kept in the run directory, so a
    resumed run plans the same), less the `spent` seconds before training that count against the plan's minutes,
    and the Trainer's schedule set to them."""
    kept = Path(cfg.output_dir) / runs.STEP_TIME
    speed = runs.read_json(kept)
    if speed is None:
        batch = data.train_features[:cfg.batch_size]
        tokens = _epoch_tokens(cfg, batch, share=shares_prefix(cfg, trainer.model))
        speed = {**time_one_step(trainer, batch, tokens).__dict__, "spent": round(spent, 1)}
        if _is_main():
            runs.write_json(kept, speed)
    done = {"precision": cfg.precision, "recompute": cfg.recompute}
    cfg, again = _resolve_defaults(planned.model_copy(update=done), sizes, speed=Speed(**speed))
    kept_reasons = {field: chosen.reasons[field] for field in done if field in chosen.reasons}
    chosen = Chosen(again.values, {**again.reasons, **kept_reasons}, again.total_steps)
    args = trainer.args
    args.num_train_epochs, args.warmup_steps = cfg.epochs, cfg.warmup_ratio
    if cfg.eval_steps:
        args.eval_steps, args.save_steps = cfg.eval_steps, cfg.save_steps
    return cfg, chosen


def _score_before(cfg: TrainConfig, model, tokenizer, data: _Data, parent: RunInfo | None,
                  reference: dict | None = None) -> dict:
    """metrics.json's "before", kept in metrics_before.json so that a resumed run does not score it again."""
    run_dir = Path(cfg.output_dir)
    before = runs.read_json(run_dir / runs.METRICS_BEFORE)  # kept from an interrupted attempt of this run
    if before is None and cfg.task == "preference":
        before = _preference_before(cfg, model, tokenizer, data, parent, reference)
    elif before is None:
        before = _base_score(model, tokenizer, cfg, data.train_records, data.eval_records, data.labels)
        if parent and before:
            before["before_kind"] = "parent run"
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(run_dir / runs.METRICS_BEFORE, before)
    return before


def _reference(cfg: TrainConfig, trainer: RunTrainer, tokenizer, data: _Data, parent: RunInfo | None,
               metrics: dict) -> tuple[dict | None, float]:
    """A preference run's reference pass (preference.reference_pass) on the policy as it starts (the method on,
    its frozen weights in the precision they train in: so the first step's rewards are exactly 0, and bf16 scores
    it ~2x faster on a CPU with bf16 units) and its "before" (into `metrics`); (the held-out reference, the seconds
    it took, which a CPU plan counts against its minutes)."""
    started = time.perf_counter()
    reference = reference_pass(cfg, trainer.model, tokenizer.pad_token_id, data.train_features, data.eval_features)
    spent = time.perf_counter() - started
    if cfg.evaluate_before and _is_main():
        metrics["before"] = _score_before(cfg, trainer.model, tokenizer, data, parent, reference)
    return reference, spent


def _apply_method(cfg: TrainConfig, model, parent: RunInfo | None, total_steps: int):
    if parent and parent.peft:  # a PEFT parent's adapter is already on, trainable
        return model
    with warnings.catch_warnings():  # peft calls a transformers API that transformers deprecated: noise to users
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return prepare(model, cfg.method, task=cfg.model_task, total_steps=total_steps,
                       tokenizer_path=resolve(cfg.model))


def _build_trainer(cfg: TrainConfig, model, tokenizer, data: _Data, parent: RunInfo | None,
                   labelled_only: bool) -> RunTrainer:
    anchor = anchor_for(cfg, model, _parent_features(cfg, parent, tokenizer, data.labels), collator(cfg, tokenizer))
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [JsonlLog(run_dir)]
    if cfg.method.name == "adalora":
        callbacks.append(AdaLora())
    if cfg.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping.patience))
    trainer = (PreferenceTrainer if cfg.task == "preference" else RunTrainer)(
        model=model, args=_training_args(cfg, run_dir / runs.CHECKPOINTS, bool(data.eval_features)),
        train_dataset=data.train_features, eval_dataset=data.eval_features or None,
        data_collator=collator(cfg, tokenizer, share=shares_prefix(cfg, model)), callbacks=callbacks,
        compute_metrics=eval_metrics_fn(cfg.task, data.labels))
    trainer.keep = cfg.save_total_limit
    trainer.anchor = anchor
    trainer.labelled_only = labelled_only and supports_labelled_only(model, cfg)
    trainer.group_by_length = cfg.group_by_length and not cfg.packing  # packed rows are all max_length long
    if cfg.task == "preference":
        configure(trainer, cfg.preference, share=shares_prefix(cfg, model))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Progress())
    return trainer


def _lower_precision(cfg: TrainConfig, trainer: RunTrainer, chosen: Chosen) -> tuple[TrainConfig, list[str]]:
    """Frozen weights in bf16 and activations recomputed, as configured or chosen for this device; (the config
    with what was chosen, the lowered modules to restore). Done once the Trainer is built: it has placed the
    model, and its starting weights are the fp32 ones."""
    device = "cuda" if _cuda() else "cpu"
    if cfg.precision == "auto":
        setting, chosen.reasons["precision"] = precision.choose(cfg.method, device)
        cfg = cfg.model_copy(update={"precision": setting})  # the run saves what it used
    lowered = precision.lower_frozen_linears(trainer.model) if cfg.precision == "bf16" else []
    if cfg.recompute is None:
        on, chosen.reasons["recompute"] = precision.choose_recompute(
            trainer.model.config, cfg.batch_size, cfg.max_length, device,
            weight_bytes=sum(p.numel() * p.element_size() for p in trainer.model.parameters()))
        cfg = cfg.model_copy(update={"recompute": on})
    if cfg.recompute:
        precision.recompute_activations(trainer.model)
    _print_defaults({field: chosen.reasons[field] for field in ("precision", "recompute") if field in chosen.reasons})
    return cfg, lowered


def _fit(cfg: TrainConfig, trainer: RunTrainer, resume: bool) -> _Fit:
    """Train, from the last complete checkpoint when resuming; Ctrl-C is a sentence saying how to go on."""
    run_dir = Path(cfg.output_dir)
    checkpoints = run_dir / runs.CHECKPOINTS
    resume_from = None
    if resume:
        resume_from = runs.complete_checkpoints(checkpoints)[-1]
        # nan (unknown, and stays so) for a checkpoint marked before loss_sum was recorded
        trainer.loss_sum = runs.read_marker(resume_from).get("loss_sum", math.nan)
        if _is_main():
            runs.truncate_log(run_dir, runs.checkpoint_step(resume_from))
        log.warning("resuming from %s", resume_from)
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        done = runs.complete_checkpoints(checkpoints)
        hint = f"continue from {done[-1].name} with --resume" if done else "no checkpoint was complete yet"
        if cfg.method.name == "adalora":
            hint = _NO_ADALORA_RESUME
        raise RunError(f"training interrupted at step {trainer.state.global_step}; {hint}") from None
    wall = time.perf_counter() - started
    metrics = dict(result.metrics)
    if resume_from and not math.isnan(trainer.loss_sum):
        metrics["train_loss"] = trainer.loss_sum / max(trainer.state.global_step, 1)
    return _Fit(metrics, wall)


def _save_model(cfg: TrainConfig, trainer: RunTrainer, tokenizer, template: str | None) -> None:
    """The weights (or adapter), the tokenizer with the chat template the run trained with, the resolved config."""
    run_dir = Path(cfg.output_dir)
    if template:
        tokenizer.chat_template = template
    trainer.save_model(str(run_dir))
    tokenizer.save_pretrained(str(run_dir))
    runs.drop_non_artifacts(run_dir)
    save_config(cfg, run_dir / runs.CONFIG)


def _train_metrics(fit: _Fit, trainer: RunTrainer, parameters: tuple[int, int], data: _Data) -> dict:
    trainable, total = parameters
    seen, stats = trainer.state.num_input_tokens_seen, data.stats
    return {**fit.metrics, "wall_seconds": fit.wall, "trainable_parameters": trainable, "tokens_seen": seen,
            "tokens_per_second": seen / max(fit.metrics.get("train_runtime", fit.wall), 1e-9),
            "total_parameters": total, "examples": len(data.train_records),
            "tokens": getattr(stats, "tokens", None), "learnable_tokens": getattr(stats, "learnable_tokens", None),
            "truncated": getattr(stats, "truncated", None), "dropped": getattr(stats, "dropped", None)}


def _score_after(cfg: TrainConfig, model, tokenizer, data: _Data, parent: RunInfo | None = None,
                 reference: dict | None = None) -> dict:
    """metrics.json's "after"; the predictions behind it go to predictions.jsonl."""
    if cfg.task == "preference":
        return _preference_after(cfg, model, tokenizer, data, parent, reference)
    after = _score(model, tokenizer, cfg, data.eval_records, data.labels, "after (trained)")
    if after:
        runs.write_predictions(Path(cfg.output_dir), after.predictions)
    return after.metrics if after else {}


def _save_run(cfg: TrainConfig, data: _Data, parent: RunInfo | None, chosen: Chosen, metrics: dict) -> None:
    run_dir = Path(cfg.output_dir)
    runs.write_metrics(run_dir, metrics)
    # run.json last: it is what makes the directory a finished run (runs.is_complete). Killed before it, the
    # run still has its checkpoints and --resume finishes it; after it, metrics.json is there for readers.
    runs.write_info(run_dir, _run_info(cfg, data, parent, chosen.reasons))
    runs.finish(run_dir)


# ---------------------------------------------------------------------------------------------------------
# what the phases share
# ---------------------------------------------------------------------------------------------------------

def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _cuda() -> bool:
    return torch.cuda.is_available()


def _print_defaults(reasons: dict) -> None:
    if _is_main():
        for line in reasons.values():
            print(f"defaults: {line}", file=sys.stderr, flush=True)


def _training_args(cfg: TrainConfig, checkpoints: Path, has_eval: bool) -> TrainingArguments:
    best = best_checkpoint(cfg, has_eval)  # (metric, greater_is_better) or None
    os.environ.update(tracking.environment(cfg.report_to, checkpoints.parent))  # the integrations read these
    return TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.scheduler,
        seed=cfg.seed, logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=None,  # RunTrainer rotates, atomically
        eval_strategy="steps" if cfg.eval_steps and has_eval else "no", eval_steps=cfg.eval_steps,
        load_best_model_at_end=best is not None, metric_for_best_model=best[0] if best else None,
        greater_is_better=best[1] if best else None, remove_unused_columns=False,
        report_to=cfg.report_to or "none", run_name=cfg.run_name or Path(cfg.output_dir).name,
        use_cpu=not _cuda(), ddp_backend="gloo" if not _cuda() and _world_size() > 1 else None,
        dataloader_num_workers=0, disable_tqdm=not _is_main(),
        # Packed rows have no attention mask and hold only a sliver of padding: count every token there.
        include_num_input_tokens_seen="all" if cfg.packing else "non_padding")


def _score(model, tokenizer, cfg: TrainConfig, records, labels, desc: str, *, prompting=None, pool=()):
    """The Evaluation of `model` on the eval records (at most eval_limit of them), or None without records. The
    scorer is chosen as for `tunesmith eval` (evaluation.score)."""
    if not records:
        return None
    records = records[: cfg.eval_limit] if cfg.eval_limit else records
    return score(model, tokenizer, sft_records(records, cfg) if cfg.task == "sft" else records, cfg.task,
                 labels=labels, prompting=prompting, pool=pool, seed=cfg.seed,
                 # data.chat_template is the sft data's; a classifier's prompts keep the tokenizer's own
                 chat_template=cfg.data.chat_template if cfg.task == "sft" else None, max_length=cfg.max_length,
                 **(sft_chat(cfg) if cfg.task == "sft" else {}),
                 params=SamplingParams(max_new_tokens=cfg.eval_max_new_tokens),
                 desc=f"{desc}: {len(records)} held-out")


def _base_score(model, tokenizer, cfg: TrainConfig, train_records, eval_records, labels) -> dict:
    """The base model's score, and what kind of score it is: sft is zero-shot with the same chat template; a
    classifier on a causal-LM base with `prompting` set is scored through the language model (verbalizers);
    otherwise a classifier's "before" is its untrained, randomly initialised head."""
    if not eval_records:
        return {}
    desc = "before (base model)"
    if cfg.task == "classify" and cfg.prompting is not None and is_causal_lm(cfg.model):
        result = _score(load_causal_lm(cfg.model), tokenizer, cfg, eval_records, labels, desc,
                        prompting=cfg.prompting, pool=train_records)
        return {**result.metrics, "before_kind": f"{result.metrics.pop('prompting')} prompting (verbalizer)"}
    kind = "zero-shot" if cfg.task == "sft" else "untrained head"
    return {**_score(model, tokenizer, cfg, eval_records, labels, desc).metrics, "before_kind": kind}


def _run_info(cfg: TrainConfig, data: _Data, parent: RunInfo | None, defaults: dict) -> RunInfo:
    import peft  # only for its version: imported here, after callbacks.py imported the Trainer its own way

    base = cfg.model if cfg.model in EMBEDDED or not Path(cfg.model).exists() else str(Path(cfg.model).resolve())
    return RunInfo(
        path=Path(cfg.output_dir).resolve(), task=cfg.model_task, base_model=base, method=cfg.method.name,
        peft=cfg.method.name in PEFT_METHODS, labels=data.labels,
        chat_template_fingerprint=template_fingerprint(data.template) if data.template else None,
        defaults=defaults,  # what training/defaults.py chose, and why: {field: line}
        versions={"tunesmith": __version__, "transformers": transformers.__version__, "peft": peft.__version__,
                  "torch": torch.__version__, **_trl_version(cfg)},
        data=data.files, replay=data.replay, parent=parent.link() if parent else None,
        lineage=lineage.lineage(parent),
        regularization=cfg.regularization.model_dump() if cfg.regularization else None, tools=data.tools,
        # a preference run is a generation (sft) model; how it was tuned is recorded beside the task
        extra={"preference": cfg.preference.model_dump()} if cfg.preference else {},
        **(sft_chat(cfg) if cfg.model_task == "sft" else {}))


def _trl_version(cfg: TrainConfig) -> dict:
    """{"trl": its version} for a preference run, whose losses are TRL's."""
    if cfg.task != "preference":
        return {}
    from importlib.metadata import version

    return {"trl": version("trl")}


def _parent_features(cfg: TrainConfig, parent: RunInfo | None, tokenizer, labels) -> list[dict] | None:
    """EWC's Fisher estimate needs the parent's own training examples, as the parent recorded them."""
    if not (cfg.regularization and cfg.regularization.kind == "ewc"):
        return None
    recorded = (parent.train_data or {}).get("path")
    if not recorded or not Path(recorded).is_file():
        raise RunError(f"regularization: ewc estimates the Fisher on the parent's training data, but "
                       f"{parent.path} records {recorded or 'none'}; use kind: l2sp")
    features, _ = build_features(cfg, tokenizer, read_data(recorded, cfg), labels, recorded)
    return features


# ---------------------------------------------------------------------------------------------------------
# preference tuning: held-out pairs, and what the run it continues scored on its own task
# ---------------------------------------------------------------------------------------------------------

def _as_sft(records: list[dict], cfg: TrainConfig) -> list[dict]:
    """The chat or completion records a generation run learns from (a preference record's chosen or only reply)."""
    if cfg.task != "preference":
        return sft_records(records, cfg)
    from ..data.preference import as_sft

    return [as_sft(r, "chosen" if "chosen" in r else "completion") for r in records]


def _parent_task(parent: RunInfo | None) -> tuple[TrainConfig, list[dict]] | None:
    """(config, held-out records) of the sft run a preference run continues, to score its task before and after;
    None (said once) when there is none or its data is gone."""
    if parent is None or not (parent.path / runs.CONFIG).is_file():
        return None
    try:
        parent_cfg = load_config(parent.path / runs.CONFIG)
        if parent_cfg.task != "sft":
            return None
        _, records = load_splits(parent_cfg)
    except (OSError, TunesmithError) as err:
        log.warning("the parent run's task is not scored: its eval data cannot be read (%s)", err)
        return None
    return (parent_cfg, records) if records else None


def _preference_before(cfg: TrainConfig, model, tokenizer, data: _Data, parent: RunInfo | None,
                       reference: dict | None) -> dict:
    """The run it starts from on the held-out pairs (its scores are the reference's) and, for an sft parent, that
    run's own score on its task, as its metrics.json says."""
    if reference is None:
        return {}
    before = held_out(cfg, model, tokenizer.pad_token_id, data.eval_features, data.eval_records, reference,
                      scores=reference).metrics
    task = _parent_task(parent)
    if task:
        recorded = runs.read_metrics(parent.path).get("after", {})
        before.update({**recorded, "task_data": task[0].data.eval or task[0].data.train})
    return {**before, "before_kind": "parent run" if parent else "base model"}


def _preference_after(cfg: TrainConfig, model, tokenizer, data: _Data, parent: RunInfo | None,
                      reference: dict | None) -> dict:
    """The trained run on the held-out pairs (predictions.jsonl) and, for an sft parent, on that run's task."""
    if reference is None:
        return {}
    result = held_out(cfg, model, tokenizer.pad_token_id, data.eval_features, data.eval_records, reference)
    runs.write_predictions(Path(cfg.output_dir), result.predictions)
    task = _parent_task(parent)
    if task:
        parent_cfg, records = task
        scored = _score(model, tokenizer, parent_cfg, records, None, "after (trained): the parent's task")
        result.metrics.update({**scored.metrics, "task_data": parent_cfg.data.eval or parent_cfg.data.train})
    return result.metrics

"""The one training loop, for every task and method, on transformers' `Trainer`.

`train(config)` reads and tokenizes the data, loads the base model for the task, applies the method
(methods.py), scores the base model on the eval split, trains with atomic checkpoints that `--resume`
picks up, then writes a self-describing run directory:

    run/
      adapter_model.safetensors + adapter_config.json   (PEFT methods)  or  model.safetensors + config.json
      tokenizer files (incl. chat_template.jinja)
      train_config.yaml   the resolved config
      run.json            task, base model, method, label map, chat-template fingerprint, versions
      log.jsonl           one line per log/eval event: step, loss, lr, eval metrics
      metrics.json        {"before": ..., "after": ..., "train": ...} ("before_kind" says what "before" scored)
      predictions.jsonl   the trained model on the eval split: input, gold, prediction, correct
"""

from __future__ import annotations

import json
import math
import logging
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import TunesmithError
from .config import PEFT_METHODS, ConfigError, TrainConfig, load_config, save_config
from .data.formats import kind_of, read_records, to_chat, to_completion
from .data.templates import chat_template_for, template_fingerprint
from .data.tokenize import encode_classification, encode_tagging, tokenize_records

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
COMPLETE = "tunesmith-complete"  # written last into a checkpoint: only marked checkpoints are resumed from
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# peft checkpoints neither AdaLoRA's importance scores nor loads an adapter already cut to its rank pattern.
_NO_ADALORA_RESUME = "AdaLoRA runs cannot be resumed (peft does not checkpoint the rank budget); start a new run"


class RunError(TunesmithError, RuntimeError):
    """A run that cannot start as asked (e.g. its directory already holds another run)."""


@dataclass
class Run:
    path: Path
    metrics: dict


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------

def _read(path: str, cfg: TrainConfig) -> list[dict]:
    return read_records(path, format=cfg.data.format, text_column=cfg.data.text_column,
                        label_column=cfg.data.label_column)


def load_splits(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) records: the eval file, or a seeded split of train when there is none."""
    train = _read(cfg.data.train, cfg)
    if cfg.data.eval:
        return train, _read(cfg.data.eval, cfg)
    if cfg.data.eval_fraction <= 0:
        return train, []
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, int(len(train) * cfg.data.eval_fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


_EXPECTED_KIND = {"classify": ("classification",), "ner": ("tagging",), "sft": ("chat", "completion")}


def check_kind(records: list[dict], cfg: TrainConfig, source: str) -> None:
    kind = kind_of(records[0])
    if kind not in _EXPECTED_KIND[cfg.task]:
        raise ConfigError(f"{source}: holds {kind} records, but task {cfg.task} trains on "
                          f"{' or '.join(_EXPECTED_KIND[cfg.task])} data")


def sft_records(records: list[dict], cfg: TrainConfig) -> list[dict]:
    convert = {"chat": to_chat, "completion": to_completion}.get(cfg.data.sft_format)
    return [convert(r) for r in records] if convert else records


def label_list(records: list[dict], task: str) -> list[str]:
    """Sorted label names (classify) or tags (ner, with O first), so ids are stable across runs."""
    if task == "classify":
        return sorted({r["label"] for r in records})
    tags = {t for r in records for t in r["tags"]}
    return ["O"] + sorted(tags - {"O"})


def build_features(cfg: TrainConfig, tokenizer, records: list[dict], labels: list[str] | None, source: str):
    """Model inputs for one split. sft: input ids + loss-masked labels (packed into rows when asked)."""
    if cfg.task == "sft":
        from .models import load_generation_config

        examples, stats = tokenize_records(tokenizer, sft_records(records, cfg), max_length=cfg.max_length,
                                           chat_template=cfg.data.chat_template, source=source,
                                           generation_config=load_generation_config(cfg.model))
        return [e.features() for e in examples], stats
    label2id = {label: i for i, label in enumerate(labels)}
    unknown = sorted({r.get("label") for r in records if cfg.task == "classify" and r["label"] not in label2id}
                     | {t for r in records if cfg.task == "ner" for t in r["tags"] if t not in label2id})
    if unknown:
        raise ConfigError(f"{source}: labels {unknown} do not occur in the training data")
    encode = encode_classification if cfg.task == "classify" else encode_tagging
    return encode(tokenizer, records, label2id, cfg.max_length), None


def collator(cfg: TrainConfig, tokenizer):
    from .data.packing import PackedCollator, PaddingCollator

    if cfg.task == "sft":
        return PackedCollator(tokenizer.pad_token_id) if cfg.packing else PaddingCollator(tokenizer.pad_token_id)
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if cfg.task == "classify":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForTokenClassification(tokenizer)


# ---------------------------------------------------------------------------------------------------------
# callbacks and checkpoints
# ---------------------------------------------------------------------------------------------------------

def _callbacks():
    """Built lazily so importing tunesmith does not import transformers' Trainer."""
    from transformers import ProgressCallback, TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends every log/eval event to run/log.jsonl (main process only)."""

        def __init__(self, path: Path):
            self.path = path

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                # Trainer puts its running speed metrics into every step's logs when it counts tokens; only
                # tokens/s is worth a line per step, the rest belongs to the final summary (with train_loss).
                noise = {"total_flos"} | ({"train_runtime", "train_samples_per_second", "train_steps_per_second"}
                                          if "train_loss" not in logs else set())
                entry = {"step": state.global_step, **{k: v for k, v in logs.items() if k not in noise}}
                if "learning_rate" in entry:
                    entry["lr"] = entry.pop("learning_rate")
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")

    class Progress(ProgressCallback):
        """transformers' bar (steps and ETA) with the latest loss on it instead of printed dicts. Where stderr
        is not a terminal (CI logs, files) a bar is a mess of carriage returns: plain lines are printed instead."""

        def __init__(self):
            super().__init__()
            self.plain = not sys.stderr.isatty()
            self.started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            if not self.plain:
                super().on_train_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            if not self.plain:
                super().on_step_end(args, state, control, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            if not self.plain:
                super().on_train_end(args, state, control, **kwargs)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if not self.plain:
                super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "eval_loss") and v is not None}
            if not shown:
                return
            if not self.plain and self.training_bar is not None:
                self.training_bar.set_postfix(shown, refresh=False)
            elif self.plain:
                elapsed = time.perf_counter() - self.started
                eta = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
                values = " ".join(f"{k} {v}" for k, v in shown.items())
                print(f"step {state.global_step}/{state.max_steps} {values} "
                      f"({elapsed:.0f}s, eta {eta:.0f}s)", file=sys.stderr, flush=True)

    class AdaLora(TrainerCallback):
        """AdaLoRA's rank budget is reallocated from gradient importance after each optimizer step, before
        the gradients are zeroed (peft's documented loop; Trainer does not call it on its own)."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            peft_model = model.module if hasattr(model, "module") else model
            peft_model.base_model.update_and_allocate(state.global_step)

    return JsonlLog, Progress, AdaLora


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints that were fully written (carry the COMPLETE marker), oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / COMPLETE).exists()]
    return [p for _, p in sorted(found)]


def _trainer_class():
    from transformers import Trainer

    class RunTrainer(Trainer):
        """Trainer whose checkpoints are atomic for resuming: the marker file is written (via rename) only after
        transformers has written weights, optimizer, scheduler, RNG and trainer state; old checkpoints are
        renamed away before deletion so a half-deleted one is never mistaken for a usable one."""

        keep: int = 2
        # Summed training loss of every step so far, carried across resumes in the marker: transformers' own
        # `train_loss` only averages the steps run since the last resume.
        loss_sum: float = 0.0

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.loss_sum += loss.item()  # no extra sync: Trainer already checks every step's loss for nan/inf
            return loss

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if not self.args.should_save:
                return
            directory = Path(self.args.output_dir)
            current = directory / f"checkpoint-{self.state.global_step}"
            tmp = current / f".{COMPLETE}.tmp"
            tmp.write_text(json.dumps({"step": self.state.global_step, "loss_sum": self.loss_sum}))
            os.replace(tmp, current / COMPLETE)
            best = self.state.best_model_checkpoint
            for old in complete_checkpoints(directory)[:-self.keep]:
                if best and Path(best).resolve() == old.resolve():
                    continue
                trash = old.with_name(f".deleting-{old.name}")
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)

    return RunTrainer


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------

def _claim(run_dir: Path, resume: bool) -> None:
    """Never overwrite what a user has: a finished run or someone else's files stop a new run here."""
    checkpoints = run_dir / "checkpoints"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"output_dir {run_dir} is a file, not a directory; set output_dir to a new directory")
    if resume:
        if not complete_checkpoints(checkpoints):
            raise RunError(f"{run_dir}: no complete checkpoint to resume from")
        return
    if (run_dir / RUN_FILE).exists():
        raise RunError(f"{run_dir} already holds a finished run; set output_dir to a new directory")
    if complete_checkpoints(checkpoints):
        raise RunError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it, "
                       "or set output_dir to a new directory")
    if run_dir.exists() and any(p.name not in _LEFTOVERS for p in run_dir.iterdir()):
        raise RunError(f"{run_dir} exists and is not empty; set output_dir to a new directory")
    # What is left is only ours, from a run stopped before its first complete checkpoint: start it afresh.
    for name in _LEFTOVERS:
        path = run_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# Files a run writes before its first complete checkpoint; nothing a user made.
_LEFTOVERS = ("checkpoints", "log.jsonl", "metrics_before.json")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _training_args(cfg: TrainConfig, checkpoints: Path, has_eval: bool):
    from transformers import TrainingArguments

    watch = cfg.early_stopping
    greater = watch.greater_is_better if watch and watch.greater_is_better is not None else (
        watch is not None and not watch.metric.endswith("loss"))
    return TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.scheduler,
        seed=cfg.seed, logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=None,  # RunTrainer rotates, atomically
        eval_strategy="steps" if cfg.eval_steps and has_eval else "no", eval_steps=cfg.eval_steps,
        load_best_model_at_end=bool(watch), metric_for_best_model=watch.metric if watch else None,
        greater_is_better=greater if watch else None, report_to="none", remove_unused_columns=False,
        use_cpu=not _cuda(), ddp_backend="gloo" if not _cuda() and _world_size() > 1 else None,
        dataloader_num_workers=0, disable_tqdm=not _is_main(),
        # Packed rows have no attention mask and hold only a sliver of padding: count every token there.
        include_num_input_tokens_seen="all" if cfg.packing else "non_padding")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _eval_metrics_fn(task: str, labels: list[str] | None):
    """Trainer's compute_metrics for classify/ner evaluation during training (sft uses eval_loss)."""
    if task == "sft":
        return None
    from .evaluate import classification_metrics, ner_metrics

    def compute(pred):
        logits, gold = pred.predictions, pred.label_ids
        argmax = logits.argmax(-1)
        if task == "classify":
            return classification_metrics([labels[g] for g in gold], [labels[p] for p in argmax], labels)
        pairs = [[(labels[g], labels[p]) for g, p in zip(gr, pr) if g != -100] for gr, pr in zip(gold, argmax)]
        return ner_metrics([[g for g, _ in row] for row in pairs], [[p for _, p in row] for row in pairs])

    return compute


def _score(model, tokenizer, cfg: TrainConfig, records, labels, desc: str):
    """The Evaluation of `model` on the eval records (at most eval_limit of them), or None without records."""
    from .evaluate import evaluate_records

    if not records:
        return None
    records = records[: cfg.eval_limit] if cfg.eval_limit else records
    return evaluate_records(model, tokenizer, sft_records(records, cfg) if cfg.task == "sft" else records, cfg.task,
                            labels=labels, chat_template=cfg.data.chat_template, max_length=cfg.max_length,
                            max_new_tokens=cfg.eval_max_new_tokens, desc=f"{desc}: {len(records)} held-out")


def _score_before(model, tokenizer, cfg: TrainConfig, train_records, eval_records, labels) -> dict:
    """The base model's score, and what kind of score it is: sft is zero-shot with the same chat template; a
    classifier on a causal-LM base with `prompting` set is scored through the language model (verbalizers);
    otherwise a classifier's "before" is its untrained, randomly initialised head."""
    from .evaluate import _is_causal_lm

    if not eval_records:
        return {}
    if cfg.task == "classify" and cfg.prompting is not None and _is_causal_lm(cfg.model):
        from .models import load_causal_lm
        from .prompting import classify_by_prompting

        records = eval_records[: cfg.eval_limit] if cfg.eval_limit else eval_records
        result = classify_by_prompting(load_causal_lm(cfg.model), tokenizer, records, labels, cfg.prompting,
                                       pool=train_records, seed=cfg.seed)
        return {**result.metrics, "before_kind": f"{result.metrics.pop('prompting')} prompting (verbalizer)"}
    kind = "zero-shot" if cfg.task == "sft" else "untrained head"
    return {**_score(model, tokenizer, cfg, eval_records, labels, desc="before (base model)").metrics,
            "before_kind": kind}


def _run_info(cfg: TrainConfig, tokenizer, labels, template) -> dict:
    import peft
    import torch
    import transformers

    from . import __version__
    from .models import EMBEDDED

    base = cfg.model if cfg.model in EMBEDDED or not Path(cfg.model).exists() else str(Path(cfg.model).resolve())
    return {"task": cfg.task, "base_model": base, "method": cfg.method.name,
            "peft": cfg.method.name in PEFT_METHODS,
            "labels": labels, "chat_template_fingerprint": template_fingerprint(template) if template else None,
            "versions": {"tunesmith": __version__, "transformers": transformers.__version__, "peft": peft.__version__,
                         "torch": torch.__version__}}


def train(config: TrainConfig | str | Path | dict, overrides: list[str] = (), *, resume: bool = False) -> Run:
    """Train as configured and return the run (its directory and metrics). See the module docstring."""
    from transformers import EarlyStoppingCallback, ProgressCallback, set_seed

    from .data.packing import pack
    from .methods import prepare, trainable_parameters
    from .models import load_for_task, load_tokenizer, resolve

    cfg = config if isinstance(config, TrainConfig) else load_config(config, list(overrides))
    run_dir = Path(cfg.output_dir)
    checkpoints = run_dir / "checkpoints"
    if resume and cfg.method.name == "adalora":
        raise RunError(f"{run_dir}: {_NO_ADALORA_RESUME}")
    if _is_main():  # other ranks would see rank 0's first files and refuse the directory
        _claim(run_dir, resume)
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model)
    train_records, eval_records = load_splits(cfg)
    check_kind(train_records, cfg, cfg.data.train)
    if eval_records:
        check_kind(eval_records, cfg, cfg.data.eval or cfg.data.train)
    labels = label_list(train_records, cfg.task) if cfg.task != "sft" else None
    train_features, stats = build_features(cfg, tokenizer, train_records, labels, cfg.data.train)
    eval_features, _ = build_features(cfg, tokenizer, eval_records, labels, cfg.data.eval or "eval split") \
        if eval_records else ([], None)
    if cfg.packing:
        train_features = pack(train_features, cfg.max_length)
        eval_features = pack(eval_features, cfg.max_length) if eval_features else []

    per_step = cfg.batch_size * cfg.grad_accum * _world_size()
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * math.ceil(len(train_features) / per_step))
    template = chat_template_for(tokenizer, cfg.data.chat_template) if cfg.task == "sft" else None

    model = load_for_task(cfg.model, cfg.task, labels, tokenizer=tokenizer)
    model.config.use_cache = False  # a KV cache during training also hides packed-sequence boundaries
    metrics: dict = {}
    before_file = run_dir / "metrics_before.json"
    if cfg.evaluate_before and _is_main():
        metrics["before"] = _read_json(before_file)  # kept from an interrupted attempt of this run
        if metrics["before"] is None:
            metrics["before"] = _score_before(model, tokenizer, cfg, train_records, eval_records, labels)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(before_file, metrics["before"])
    # The method's fresh weights (LoRA, heads) start from the run's seed, whatever scoring "before" drew.
    set_seed(cfg.seed)
    with warnings.catch_warnings():  # peft calls a transformers API that transformers deprecated: noise to users
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = prepare(model, cfg.method, task=cfg.task, total_steps=total_steps, tokenizer_path=resolve(cfg.model))
    trainable, total = trainable_parameters(model)

    JsonlLog, Progress, AdaLora = _callbacks()
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [JsonlLog(run_dir / "log.jsonl")]
    if cfg.method.name == "adalora":
        callbacks.append(AdaLora())
    if cfg.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping.patience))
    trainer = _trainer_class()(
        model=model, args=_training_args(cfg, checkpoints, bool(eval_features)), train_dataset=train_features,
        eval_dataset=eval_features or None, data_collator=collator(cfg, tokenizer), callbacks=callbacks,
        compute_metrics=_eval_metrics_fn(cfg.task, labels))
    trainer.keep = cfg.save_total_limit
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Progress())

    resume_from = None
    if resume:
        resume_from = str(complete_checkpoints(checkpoints)[-1])
        # nan (unknown, and stays so) for a checkpoint marked before loss_sum was recorded
        trainer.loss_sum = json.loads(Path(resume_from, COMPLETE).read_text()).get("loss_sum", math.nan)
        if _is_main():
            _truncate_log(run_dir / "log.jsonl", int(resume_from.rsplit("-", 1)[1]))
        log.warning("resuming from %s", resume_from)
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        done = complete_checkpoints(checkpoints)
        hint = f"continue from {done[-1].name} with --resume" if done else "no checkpoint was complete yet"
        if cfg.method.name == "adalora":
            hint = _NO_ADALORA_RESUME
        raise RunError(f"training interrupted at step {trainer.state.global_step}; {hint}") from None
    wall = time.perf_counter() - started
    train_metrics = dict(result.metrics)
    if resume_from and not math.isnan(trainer.loss_sum):
        train_metrics["train_loss"] = trainer.loss_sum / max(trainer.state.global_step, 1)

    if trainer.is_world_process_zero():
        if template:
            tokenizer.chat_template = template  # the run carries the template it was trained with
        trainer.save_model(str(run_dir))
        tokenizer.save_pretrained(str(run_dir))
        for extra in ("training_args.bin", "README.md"):  # a pickle and peft's empty model card: not artifacts
            (run_dir / extra).unlink(missing_ok=True)
        labels_info = _run_info(cfg, tokenizer, labels, template)
        write_json(run_dir / RUN_FILE, labels_info)
        save_config(cfg, run_dir / "train_config.yaml")
        seen = trainer.state.num_input_tokens_seen
        metrics["train"] = {**train_metrics, "wall_seconds": wall, "trainable_parameters": trainable,
                            "tokens_seen": seen, "tokens_per_second": seen / max(result.metrics.get("train_runtime", wall), 1e-9),
                            "total_parameters": total, "examples": len(train_records),
                            "tokens": getattr(stats, "tokens", None),
                            "learnable_tokens": getattr(stats, "learnable_tokens", None),
                            "truncated": getattr(stats, "truncated", None), "dropped": getattr(stats, "dropped", None)}
        after = _score(trainer.model, tokenizer, cfg, eval_records, labels, desc="after (trained)")
        metrics["after"] = after.metrics if after else {}
        if after:
            with (run_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in after.predictions)
        write_json(run_dir / "metrics.json", metrics)
        before_file.unlink(missing_ok=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
    return Run(run_dir, metrics)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed from (they will be written again), and a
    half-written last line left by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def write_text(path: Path, text: str) -> None:
    """Write a whole file atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2))


def _read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable (truncated by a kill: recomputed)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:
        log.warning("%s is unreadable (%s); computing it again", path, err)
        return None

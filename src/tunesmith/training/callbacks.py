"""What tunesmith adds to transformers' Trainer: the log.jsonl writer, a progress bar that shows the loss (plain
lines off a terminal), AdaLoRA's budget step, the metrics computed at each evaluation, and `RunTrainer`, whose
checkpoints are atomic. Importing this module imports transformers' Trainer (without `datasets`, see
`_trainer_without_datasets`); `import tunesmith` never imports it, only training does."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback

from .. import runs
from . import loss
from .data import LengthGroupedSampler, feature_tokens


class JsonlLog(TrainerCallback):
    """Appends every log/eval event to run/log.jsonl (main process only)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            # Trainer puts its running speed metrics into every step's logs when it counts tokens; only
            # tokens/s is worth a line per step, the rest belongs to the final summary (with train_loss).
            noise = {"total_flos"} | ({"train_runtime", "train_samples_per_second", "train_steps_per_second"}
                                      if "train_loss" not in logs else set())
            entry = {"step": state.global_step, **{k: v for k, v in logs.items() if k not in noise}}
            if "learning_rate" in entry:
                entry["lr"] = entry.pop("learning_rate")
            runs.append_log(self.run_dir, entry)


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


def _trainer_without_datasets():
    """transformers' Trainer, imported without the `datasets` package. The Trainer imports it whenever it is
    installed (it comes with lm-eval, TRL and the test extras), and with it pandas and pyarrow: ~80 MB more
    resident memory in every training process (measured here: 465 MB after `import transformers.trainer` against
    383 MB without). tunesmith hands the Trainer torch datasets only, so it never needs it. While the import
    runs, `datasets` reads as absent (a None entry in sys.modules makes importlib.util.find_spec return None), so
    transformers' cached availability check answers False for this process; `import datasets` still works
    afterwards for anything else. A plain import when the Trainer or datasets is already imported, or when this
    transformers has no cached check to ask."""
    from transformers.utils import import_utils

    check = getattr(import_utils, "is_datasets_available", None)
    if "transformers.trainer" in sys.modules or "datasets" in sys.modules or not hasattr(check, "cache_clear"):
        return importlib.import_module("transformers.trainer").Trainer
    sys.modules["datasets"] = None
    try:
        check.cache_clear()
        check()  # False, and cached so
        return importlib.import_module("transformers.trainer").Trainer  # now, while datasets reads as absent
    finally:
        del sys.modules["datasets"]


class RunTrainer(_trainer_without_datasets()):
    """Trainer whose checkpoints are atomic for resuming: the marker file is written (via rename) only after
    transformers has written weights, optimizer, scheduler, RNG and trainer state; old checkpoints are
    renamed away before deletion so a half-deleted one is never mistaken for a usable one."""

    keep: int = 2
    # Summed training loss of every step so far, carried across resumes in the marker: transformers' own
    # `train_loss` only averages the steps run since the last resume.
    loss_sum: float = 0.0

    anchor = None  # regularize.Anchor: a pull toward the parent run's weights
    labelled_only = False  # loss.py: the LM head only where there are labels (sft on a causal LM)
    group_by_length = False  # data.LengthGroupedSampler: batches of similar length

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.group_by_length or not isinstance(dataset, list):
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler([feature_tokens(f) for f in dataset], self.args.train_batch_size,
                                    self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if self.labelled_only and model.training and "labels" in inputs:
            out = self._labelled_only_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch, **kwargs)
        if self.anchor is None or not model.training:  # eval loss stays the task's loss alone
            return out
        penalty = self.anchor.penalty(model.module if hasattr(model, "module") else model)
        return (out[0] + penalty, out[1]) if return_outputs else out + penalty

    def _labelled_only_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """Trainer.compute_loss's normalisation (per token over the accumulated batch when the model takes
        num_items_in_batch, scaled back up across data-parallel ranks) around loss.labelled_only_loss."""
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        value, outputs = loss.labelled_only_loss(model, inputs, items)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()
            value = value * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (value, outputs) if return_outputs else value

    def training_step(self, *args, **kwargs):
        value = super().training_step(*args, **kwargs)
        self.loss_sum += value.item()  # no extra sync: Trainer already checks every step's loss for nan/inf
        return value

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        directory = Path(self.args.output_dir)
        runs.mark_complete(runs.checkpoint_path(directory, self.state.global_step),
                           {"step": self.state.global_step, "loss_sum": self.loss_sum})
        runs.prune_checkpoints(directory, self.keep, self.state.best_model_checkpoint)


def eval_metrics_fn(task: str, labels: list[str] | None):
    """Trainer's compute_metrics for classify/ner evaluation during training (sft and preference use eval_loss)."""
    if task in ("sft", "preference"):
        return None
    from ..metrics import classification_metrics, ner_metrics

    def compute(pred):
        logits, gold = pred.predictions, pred.label_ids
        argmax = logits.argmax(-1)
        if task == "classify":
            return classification_metrics([labels[g] for g in gold], [labels[p] for p in argmax], labels)
        pairs = [[(labels[g], labels[p]) for g, p in zip(gr, pr) if g != -100] for gr, pr in zip(gold, argmax)]
        return ner_metrics([[g for g, _ in row] for row in pairs], [[p for _, p in row] for row in pairs])

    return compute

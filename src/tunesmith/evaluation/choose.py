"""Which scorer scores a model: the one decision, made by `score` for both `tunesmith eval` (through `evaluate`,
which first turns a name or a run directory into a model, a task and labels) and training's before/after."""

from __future__ import annotations

from pathlib import Path

from ..data.reasoning import Policy
from ..data.templates import merge_kwargs
from ..generation import SamplingParams
from .results import EvaluateError, Evaluation, write_results
from .scorers import evaluate_classification, evaluate_generation, evaluate_tagging

_TASK_OF_KIND = {"chat": "sft", "completion": "sft", "classification": "classify", "tagging": "ner"}


def score(model, tokenizer, records: list[dict], task: str, *, labels: list[str] | None = None, prompting=None,
          pool: list[dict] = (), seed: int = 0, chat_template: str | None = None, max_length: int = 512,
          params: SamplingParams | None = None, normalize: bool = False, desc: str = "scoring",
          chat_template_kwargs: dict | None = None, reasoning: Policy = "auto") -> Evaluation:
    """Score `model` on `records` for `task` (sft, classify or ner). With `prompting` (a PromptingConfig), a
    classifier is scored through the language model's label words and generation gets k-shot prompts, the
    exemplars drawn from `pool` with `seed` (prompting.py); otherwise the task's own scorer runs (scorers.py),
    in eval mode, and the model is left in the mode it was in. Progress is shown as `desc`. Generation renders
    chat with `chat_template_kwargs` and masks its loss with the `reasoning` policy, as sft training does."""
    chat = {"chat_template_kwargs": chat_template_kwargs, "reasoning": reasoning}
    if prompting is not None and task in ("classify", "sft"):
        from .prompting import classify_by_prompting, generate_by_prompting  # torch at import

        if task == "classify":
            return classify_by_prompting(model, tokenizer, records, labels, prompting, pool=pool, seed=seed,
                                         chat_template=chat_template)
        return generate_by_prompting(model, tokenizer, records, prompting, pool=pool, seed=seed,
                                     chat_template=chat_template, max_length=max_length, params=params,
                                     normalize=normalize, desc=desc, **chat)
    was_training = model.training
    model.eval()
    try:
        if task == "sft":
            return evaluate_generation(model, tokenizer, records, chat_template=chat_template, max_length=max_length,
                                       params=params, normalize=normalize, desc=desc, **chat)
        if task == "classify":
            return evaluate_classification(model, tokenizer, records, labels, max_length=max_length, desc=desc)
        return evaluate_tagging(model, tokenizer, records, labels, max_length=max_length, desc=desc)
    finally:
        model.train(was_training)


def evaluate(model: str | tuple, data: str | Path | list[dict], *, task: str | None = None,
             labels: list[str] | None = None, prompting=None, train_data: str | Path | list[dict] | None = None,
             output_dir: str | Path | None = None, limit: int | None = None, chat_template: str | None = None,
             max_length: int = 512, params: SamplingParams | None = None, normalize: bool = False,
             seed: int = 0, device: str | None = None, chat_template_kwargs: dict | None = None,
             reasoning: Policy | None = None) -> Evaluation:
    """Score a model on held-out data, in one call.

    `model` is an embedded name, a directory, a hub id, a tunesmith run directory, or a (model, tokenizer)
    pair. The task is the run's, else guessed from the records (chat/completion -> sft, text+label ->
    classify, tokens+tags -> ner). A classify task on a plain causal LM (no trained head) is scored through
    the language model with `prompting` (a PromptingConfig or a mapping; default: zero-shot, label names as
    label words); `train_data` supplies its k-shot exemplars. With `output_dir`, writes metrics.json and
    predictions.jsonl there. `device` (auto, cpu, cuda) moves the model there first; None leaves it where it is.
    A run's chat is rendered as it trained: its recorded chat_template_kwargs, with `chat_template_kwargs` merged
    over them, and its reasoning policy unless `reasoning` is given."""
    from .. import runs
    from ..config import PromptingConfig, load_prompting
    from ..data.formats import kind_of, read_records
    from ..models import is_causal_lm, load_causal_lm, load_run, load_tokenizer

    records = list(data) if isinstance(data, list) else read_records(data)
    if not records:
        raise EvaluateError(f"{data}: no records to evaluate")
    if kind_of(records[0]) in ("preference", "unpaired"):
        raise EvaluateError(f"{data}: holds preference records; a preference run scores its held-out pairs itself "
                            "(metrics.json before and after, predictions.jsonl); tunesmith eval scores a model's "
                            "replies to chat or completion records")
    records = records[:limit] if limit else records
    info = runs.find_run(model) if isinstance(model, (str, Path)) else None
    task = task or (info and info.task) or _TASK_OF_KIND[kind_of(records[0])]
    pool = (list(train_data) if isinstance(train_data, list) else read_records(train_data)) if train_data else []
    if isinstance(prompting, dict):
        prompting = load_prompting(prompting)
    if prompting is not None and prompting.shots > len(pool):
        raise EvaluateError(f"{prompting.shots}-shot prompting needs at least {prompting.shots} exemplars from "
                            f"the training data, but {'it has ' + str(len(pool)) if train_data else 'none was given'}"
                            " (give train_data, or --train-data on the command line)")
    labels = labels or (info and info.labels)
    if task == "classify" and not labels:
        labels = sorted({r["label"] for r in records} | {r["label"] for r in pool})
    if task == "ner" and not labels:
        raise EvaluateError("ner needs the tag list of a trained model: evaluate a tunesmith run")
    if info:
        lm, tokenizer, _ = load_run(model)
    elif isinstance(model, tuple):
        lm, tokenizer = model
    elif task == "classify" and prompting is None and not is_causal_lm(model):
        raise EvaluateError(f"{model} is not a trained classifier; evaluate a tunesmith run, or a causal LM with "
                            "prompting")
    else:
        lm, tokenizer = load_causal_lm(model), load_tokenizer(model)
        if task == "classify" and prompting is None:  # a plain causal LM has no head: it classifies by prompting
            prompting = PromptingConfig()
    if device is not None:
        from ..generation.device import place

        lm = place(lm, device)
    kwargs = merge_kwargs(info and info.chat_template_kwargs, chat_template_kwargs)
    result = score(lm, tokenizer, records, task, labels=labels, prompting=prompting, pool=pool, seed=seed,
                   chat_template=chat_template, max_length=max_length, params=params, normalize=normalize,
                   chat_template_kwargs=kwargs, reasoning=reasoning or (info and info.reasoning) or "auto")
    result.metrics = {"task": task, "examples": len(records), **result.metrics}
    if output_dir:
        write_results(result, output_dir)
    return result

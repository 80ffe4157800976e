"""Prompting without training: zero- and k-shot prompts from templates, and classification *through the
language model* with verbalizers. Each label has one or more label words; a label's score is the log of the
summed probability of its words right after the prompt (no free generation), optionally corrected by
contextual calibration (Zhao et al. 2021, "Calibrate Before Use": divide by the label probabilities the model
gives a content-free input such as "N/A")."""

from __future__ import annotations

import torch

from ..batching import device_of
from ..batching import pad as pad_rows
from ..config import PromptingConfig
from ..data.templates import PromptTemplate, select_shots
from ..generation import prompt_ids
from ..metrics import classification_metrics
from ..progress import Progress
from .results import EvaluateError, Evaluation
from .scorers import evaluate_generation


def label_words(config: PromptingConfig, labels: list[str]) -> dict[str, list[str]]:
    """label -> its words. Default: the label's name (with a leading space in completion format, where the
    word follows the prompt's last word; a chat reply starts a fresh turn)."""
    given = config.verbalizer or {}
    unknown = sorted(set(given) - set(labels))
    if unknown:
        raise EvaluateError(f"the verbalizer names labels {unknown} that are not in the data's labels {labels}")
    space = " " if config.format == "completion" else ""
    words = {}
    for label in labels:
        value = given.get(label, space + label)
        words[label] = [value] if isinstance(value, str) else list(value)
        if not words[label] or not all(words[label]):
            raise EvaluateError(f"the verbalizer gives label {label!r} an empty word")
    return words


def choose_shots(pool: list[dict], config: PromptingConfig, seed: int) -> list[dict]:
    """The same k exemplars for every query (so a calibration applies to all of them)."""
    return select_shots(pool, config.shots, strategy=config.shot_strategy, seed=seed) if config.shots else []


def classification_prompt(tokenizer, record: dict, config: PromptingConfig, labels: list[str],
                          words: dict[str, list[str]], shots: list[dict], chat_template=None) -> list[int]:
    """Token ids of the prompt for one record, ending where the label word would begin."""
    names = ", ".join(labels)
    template = PromptTemplate(config.template, answer="{{ verbalized }}",
                              instruction=PromptTemplate(config.instruction).render({"labels": names}),
                              separator="\n\n")
    # A shot shows its label as the label's first word, so the model sees the words it will be scored on.
    shown = [{**s, "labels": names, "verbalized": words[s["label"]][0]} for s in shots]
    query = {**record, "labels": names}
    if config.format == "chat":
        return prompt_ids(tokenizer, messages=template.messages(query, shown), chat_template=chat_template)
    return prompt_ids(tokenizer, prompt=template.prompt(query, shown))


def _forward(model, rows: list[list[int]], pad_id: int, positions: list[int]) -> torch.Tensor:
    """Log-probabilities (batch, len(positions), vocab) at `positions` of right-padded rows."""
    width = max(len(r) for r in rows)
    ids, mask = pad_rows(rows, pad_id, device=device_of(model))
    keep = torch.tensor(positions, device=ids.device)
    if hasattr(model, "peft_config"):
        # Prompt tuning prepends virtual tokens to the logits; the last `width` positions are the real tokens.
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:][:, keep]
    else:  # project only the positions we read onto the vocabulary (the LM head is ~1/4 of a 135M model)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    return torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def word_log_likelihoods(model, tokenizer, prompts: list[list[int]], words: list[list[int]], *,
                         batch_size: int = 8, desc: str = "scoring label words") -> torch.Tensor:
    """(n_prompts, n_words): log P(word's tokens | prompt), summed over the word's tokens.

    Single-token words are read off one forward pass of the prompt; a multi-token word needs the prompt
    followed by the word, one row per (prompt, word)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.zeros(len(prompts), len(words))
    single = [j for j, w in enumerate(words) if len(w) == 1]
    jobs = [(i, j) for i in range(len(prompts)) for j, w in enumerate(words) if len(w) > 1]
    with Progress(desc, (len(prompts) if single else 0) + len(jobs), unit="row") as progress:
        if single:
            _single_words(model, prompts, words, single, pad, batch_size, out, progress)
        _multi_token_words(model, prompts, words, jobs, pad, batch_size, out, progress)
    return out


def _single_words(model, prompts, words, single, pad, batch_size, out, progress) -> None:
    first = torch.tensor([words[j][0] for j in single])
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size]
        positions = sorted({len(r) - 1 for r in rows})
        logp = _forward(model, rows, pad, positions)
        last = logp[torch.arange(len(rows)), torch.tensor([positions.index(len(r) - 1) for r in rows])]
        out[start:start + len(rows), single] = last[:, first].cpu()  # (batch, single words)
        progress.update(len(rows))


def _multi_token_words(model, prompts, words, jobs, pad, batch_size, out, progress) -> None:
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        # the token at position p is predicted by the logits at p - 1
        needed = [list(range(len(prompts[i]) - 1, len(prompts[i]) - 1 + len(words[j]))) for i, j in chunk]
        positions = sorted({p for ps in needed for p in ps})
        logp = _forward(model, [prompts[i] + words[j] for i, j in chunk], pad, positions)
        for row, ((i, j), ps) in enumerate(zip(chunk, needed)):
            cols = torch.tensor([positions.index(p) for p in ps])
            out[i, j] = logp[row, cols, torch.tensor(words[j])].sum().cpu()
        progress.update(len(chunk))


def label_scores(model, tokenizer, prompts: list[list[int]], words: dict[str, list[str]], *,
                 batch_size: int = 8) -> torch.Tensor:
    """(n_prompts, n_labels) log of the summed probability of each label's words, labels in `words` order."""
    flat = [(label, w) for label, ws in words.items() for w in ws]
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for _, w in flat]
    per_word = word_log_likelihoods(model, tokenizer, prompts, ids, batch_size=batch_size)
    columns = [[k for k, (label, _) in enumerate(flat) if label == name] for name in words]
    return torch.stack([torch.logsumexp(per_word[:, c], dim=1) for c in columns], dim=1)


def _content_free(record: dict, template: str, value: str) -> dict:
    """The record with every field the template reads replaced by a content-free value."""
    fields = PromptTemplate(template).fields() - {"labels"}
    return {**record, **{f: value for f in fields}}


def classify_by_prompting(model, tokenizer, records: list[dict], labels: list[str], config: PromptingConfig, *,
                          pool: list[dict] = (), seed: int = 0, chat_template=None, batch_size: int = 8) -> Evaluation:
    """Classify each record by its arg-max label score (calibrated when asked) and score the result."""
    model.eval()
    words = label_words(config, labels)
    shots = choose_shots(list(pool), config, seed)
    prompts = [classification_prompt(tokenizer, r, config, labels, words, shots, chat_template) for r in records]
    scores = label_scores(model, tokenizer, prompts, words, batch_size=batch_size)
    if config.calibrate:
        free = [classification_prompt(tokenizer, _content_free(records[0], config.template, v), config, labels,
                                      words, shots, chat_template) for v in config.calibration_inputs]
        # p_cf: the label distribution (normalised over the labels) given content-free inputs, averaged.
        p_cf = torch.softmax(label_scores(model, tokenizer, free, words, batch_size=batch_size), dim=1).mean(0)
        scores = torch.log_softmax(scores, dim=1) - torch.log(p_cf)
    chosen = [labels[i] for i in scores.argmax(1).tolist()]
    golds = [r["label"] for r in records]
    predictions = [{"input": r["text"], "gold": g, "prediction": p, "correct": g == p,
                    "scores": dict(zip(labels, (round(x, 4) for x in s.tolist())))}
                   for r, g, p, s in zip(records, golds, chosen, scores)]
    metrics = classification_metrics(golds, chosen, labels, details=True)
    return Evaluation({**metrics, "prompting": f"{config.shots}-shot" + (" calibrated" if config.calibrate else "")},
                      predictions)


def with_shots(record: dict, shots: list[dict], separator: str = "\n\n") -> dict:
    """A chat or completion record with exemplars placed before its query: chat shots as user/assistant turns
    after the system message; completion shots as prompt+completion blocks joined by `separator`."""
    if not shots:
        return record
    if "messages" in record:
        messages = record["messages"]
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = [m for s in shots for m in s["messages"] if m["role"] != "system"]
        return {**record, "messages": system + turns + messages[len(system):]}
    blocks = [s["prompt"] + s["completion"] for s in shots]
    return {**record, "prompt": separator.join(blocks + [record["prompt"]])}


def generate_by_prompting(model, tokenizer, records: list[dict], config: PromptingConfig, *, pool: list[dict] = (),
                          seed: int = 0, chat_template=None, **kwargs) -> Evaluation:
    """Zero/k-shot generation: each record's own prompt, with the shots placed before it."""
    shots = choose_shots(list(pool), config, seed)
    result = evaluate_generation(model, tokenizer, [with_shots(r, shots) for r in records],
                                 chat_template=chat_template, **kwargs)
    result.metrics["prompting"] = f"{config.shots}-shot"
    return result

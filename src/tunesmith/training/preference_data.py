"""Preference data ready for the Trainer: each reply tokenized after its prompt (its learnable tokens the reply's, as
data/preference.py's `as_sft` spells it), pairs collated chosen-then-rejected in one batch (TRL's layout, so one
forward pass scores both), KTO's mismatched replies for its KL term, and the frozen reference's log-probabilities
added to every feature before the first step.

The reference is the model the run starts from (the SFT run it continues, or the base), as loaded: its
log-probabilities of every reply are computed once, before the method is applied, and travel with the features
(TRL's `precompute_ref_log_probs`). So no second model or adapter copy sits in memory while training, and the
reference cannot drift: it is a column of numbers."""

from __future__ import annotations

import torch

from ..batching import pad
from ..config import TrainConfig
from ..data.formats import DataError, kind_of
from ..data.preference import as_sft, is_conversational, to_unpaired
from ..data.templates import ChatTemplateError
from ..data.tokenize import IGNORE_INDEX, MaskError, TokenizeStats, tokenize_record, truncate
from ..evaluation.preference import reply_log_probs
from ..progress import Progress
from .data import feature_tokens

PAIR = ("chosen", "rejected")  # a pair feature's replies, in the order they are batched
SINGLE = ("completion", "KL")  # an unpaired feature's reply and, for KTO's KL term, a reply to another prompt


def _keys(reply: str) -> tuple[str, str]:
    """The feature keys of one reply's token ids and labels (TRL's names: input_ids for a single reply)."""
    return ("input_ids", "labels") if reply == "completion" else (f"{reply}_input_ids", f"{reply}_labels")


def replies_of(feature: dict) -> tuple[str, ...]:
    return PAIR if "chosen_input_ids" in feature else SINGLE


def records_for(records: list[dict], objective: str, source: str) -> list[dict]:
    """The records an objective trains on: pairs for dpo, orpo and simpo; single replies for kto (a pair gives a
    good and a bad one, as TRL's KTOTrainer unpairs a paired dataset)."""
    if objective != "kto":
        if kind_of(records[0]) != "preference":
            raise DataError(f"{source}: holds single replies marked good or bad; objective {objective} learns from "
                            "pairs (chosen, rejected): use objective kto")
        return records
    single = [s for r in records for s in (to_unpaired(r) if kind_of(r) == "preference" else [r])]
    if len({is_conversational(r) for r in single}) > 1:  # KTO's KL term puts one record's reply after another's prompt
        raise DataError(f"{source}: mixes conversational and plain-text records; kto pairs each prompt with another "
                        "record's reply, so they must all be one or the other")
    return single


def _tokenized(tokenizer, record: dict, reply: str, where: str, chat: dict):
    try:
        return tokenize_record(tokenizer, as_sft(record, reply), **chat)
    except (MaskError, ChatTemplateError) as err:
        raise type(err)(f"{where}: {err}") from None


def _mismatched(records: list[dict], i: int) -> dict:
    """Record i's prompt with the previous record's reply (TRL rotates the replies by one the same way)."""
    other = records[i - 1]
    return {**records[i], "completion": other["completion"]}


def build(cfg: TrainConfig, tokenizer, records: list[dict], source: str, chat: dict) -> tuple[list[dict], TokenizeStats]:
    """Features of preference records (see records_for), truncated to max_length; a record whose reply keeps no
    learnable token is dropped and counted. `chat`: tokenize_record's chat settings (template, kwargs...)."""
    records = records_for(records, cfg.preference.objective, source)
    stats, features = TokenizeStats(), []
    kto = cfg.preference.objective == "kto"
    for n, record in enumerate(records, 1):
        feature = {}
        for reply in (SINGLE if kto else PAIR):
            made = _mismatched(records, n - 1) if reply == "KL" else record
            example = _tokenized(tokenizer, made, "completion" if reply == "KL" else reply,
                                 f"{source}: record {n} ({reply})", chat)
            stats.lengths.append(len(example.input_ids))
            if len(example.input_ids) > cfg.max_length:
                stats.truncated += 1
                example = truncate(example, cfg.max_length)
            feature[_keys(reply)[0]], feature[_keys(reply)[1]] = example.input_ids, example.labels
        if kto:
            feature["label"] = record["label"]
        feature["index"] = n - 1  # its record among records_for's, for the held-out predictions
        stats.examples += 1
        learnable = [sum(x != IGNORE_INDEX for x in feature[_keys(r)[1]]) for r in replies_of(feature)]
        if not all(learnable):
            stats.dropped += 1
            continue
        stats.tokens += feature_tokens(feature)
        stats.learnable_tokens += sum(learnable)
        features.append(feature)
    return features, stats


class PreferenceCollator:
    """Pads a batch of features into TRL's inputs: a pair batch is [chosen rows; rejected rows] ([2B, T]) with a
    `completion_mask` on each reply's learnable tokens and the reference's `ref_chosen_logps` / `ref_rejected_logps`
    ([B] each); an unpaired batch is the replies ([B, T]), their `label`, the KL replies (`KL_input_ids`...) and the
    reference's `ref_logps` / `ref_KL_logps`."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def _rows(self, ids: list[list[int]], labels: list[list[int]], prefix: str = "") -> dict:
        input_ids, attention = pad(ids, self.pad_id)
        padded, _ = pad(labels, IGNORE_INDEX)
        return {f"{prefix}input_ids": input_ids, f"{prefix}attention_mask": attention,
                f"{prefix}completion_mask": (padded != IGNORE_INDEX).long()}

    def __call__(self, features: list[dict]) -> dict:
        if replies_of(features[0]) == PAIR:
            batch = self._rows([f[_keys(r)[0]] for r in PAIR for f in features],
                               [f[_keys(r)[1]] for r in PAIR for f in features])
            references = {"ref_chosen_logps": "chosen", "ref_rejected_logps": "rejected"}
        else:
            batch = {**self._rows([f["input_ids"] for f in features], [f["labels"] for f in features]),
                     **self._rows([f["KL_input_ids"] for f in features], [f["KL_labels"] for f in features], "KL_"),
                     "label": torch.tensor([f["label"] for f in features], dtype=torch.bool)}
            references = {"ref_logps": "completion", "ref_KL_logps": "KL"}
        for key, reply in references.items():
            if f"ref_{reply}" in features[0]:
                batch[key] = torch.tensor([f[f"ref_{reply}"] for f in features], dtype=torch.float32)
        return batch


def log_probs(model, features: list[dict], pad_id: int, batch_size: int, desc: str, *,
              share: bool = False) -> dict[str, list]:
    """{reply: [(log-prob sum, learnable tokens)] per feature} of every reply of `features` under `model`. A
    feature's replies go through the model in the same batch (`batch_size` features, so all their replies, as a
    training step batches them), so that with `share` (each batch on its prefix tree) they share their prompt."""
    replies = replies_of(features[0])
    rows = [{"input_ids": f[_keys(r)[0]], "labels": f[_keys(r)[1]]} for f in features for r in replies]
    with Progress(desc, len(rows)) as progress:
        scores = reply_log_probs(model, rows, pad_id, batch_size=batch_size * len(replies), progress=progress,
                                 share=share)
    return {reply: scores[n::len(replies)] for n, reply in enumerate(replies)}


def epoch_tokens(features: list[dict], batch_size: int) -> int:
    """The tokens an epoch of `features` puts through the model in batches of `batch_size` when each batch runs
    on its prefix tree (share_prefix): a pair's replies go through in one pass, sharing their prompt; KTO's
    replies and its mismatched replies in two, one each."""
    from ..data.prefix_tree import tree_tokens

    if not features:
        return 0
    if replies_of(features[0]) == PAIR:
        return tree_tokens([[f[_keys(r)[0]] for r in PAIR] for f in features], batch_size)
    return sum(tree_tokens([[f[_keys(r)[0]]] for f in features], batch_size) for r in SINGLE)


def attach_reference(features: list[dict], scores: dict[str, list]) -> None:
    """Store the reference's log-prob sum of each reply in its feature (`ref_chosen`, `ref_completion`, ...)."""
    for reply, values in scores.items():
        for feature, (total, _) in zip(features, values):
            feature[f"ref_{reply}"] = total

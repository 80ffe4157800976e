"""A run's data, ready for the Trainer: the train and eval splits, a check that the records suit the task, the
label list, model inputs (token ids with the loss mask, or encoded labels) and the collator that batches them."""

from __future__ import annotations

import random

from ..config import ConfigError, TrainConfig
from ..data.formats import EMPTY, DataError, kind_of, read_records, to_chat, to_completion
from ..data.tokenize import TokenizeStats, encode_classification, encode_tagging, tokenize_records
from ..data.tools import has_tools, rendering


def read_data(path: str, cfg: TrainConfig) -> list[dict]:
    return read_records(path, format=cfg.data.format, text_column=cfg.data.text_column,
                        label_column=cfg.data.label_column)


def load_splits(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) records: the eval file, or a seeded split of train when there is none. A file without
    records, or a split that leaves training none, is a DataError saying what to change."""
    train = _read_split(cfg.data.train, cfg, "train on; add records to it")
    if cfg.data.eval:
        return train, _read_split(cfg.data.eval, cfg, "evaluate on; add records to it, or leave data.eval unset "
                                                      "to hold out data.eval_fraction of the training data")
    if cfg.data.eval_fraction <= 0:
        return train, []
    n_eval = max(1, int(len(train) * cfg.data.eval_fraction))  # at least one: of a single record, all of it
    if n_eval >= len(train):
        raise DataError(f"{cfg.data.train}: holds {len(train)} record{'s' if len(train) != 1 else ''}, and "
                        f"data.eval_fraction {cfg.data.eval_fraction} holds out {n_eval} for evaluation, leaving "
                        "none to train on; add records, set data.eval_fraction: 0, or give data.eval a file")
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def _read_split(path: str, cfg: TrainConfig, advice: str) -> list[dict]:
    """read_data, where an empty file is a sentence saying what the run needs it for (`advice`)."""
    try:
        return read_data(path, cfg)
    except DataError as err:
        if [problem.message for problem in err.problems] != [EMPTY]:
            raise
        raise DataError(f"{path}: holds no records to {advice}") from None


def check_trainable(features: list[dict], stats: TokenizeStats | None, cfg: TrainConfig, source: str) -> None:
    """A sentence, not a run that trains zero steps and calls itself finished, when truncation to max_length
    dropped every training example (tokenize_records drops those left with no learnable token)."""
    if not features:
        raise DataError(f"{source}: none of its {stats.examples} examples keeps a learnable token once truncated "
                        f"to max_length {cfg.max_length}, so there is nothing to train on; raise max_length or "
                        "shorten the examples")


_EXPECTED_KIND = {"classify": ("classification",), "ner": ("tagging",), "sft": ("chat", "completion"),
                  "preference": ("preference", "unpaired")}


def check_kind(records: list[dict], cfg: TrainConfig, source: str) -> None:
    kind = kind_of(records[0])
    if kind not in _EXPECTED_KIND[cfg.task]:
        raise ConfigError(f"{source}: holds {kind} records, but task {cfg.task} trains on "
                          f"{' or '.join(_EXPECTED_KIND[cfg.task])} data")


def sft_records(records: list[dict], cfg: TrainConfig) -> list[dict]:
    convert = {"chat": to_chat, "completion": to_completion}.get(cfg.data.sft_format)
    return [convert(r) for r in records] if convert else records



def feature_tokens(feature: dict) -> int:
    """The tokens one training feature puts through the model: an sft example's, both replies of a preference
    pair, a reply and KTO's mismatched reply."""
    return sum(len(ids) for key, ids in feature.items() if key.endswith("input_ids"))


def sft_chat(cfg: TrainConfig) -> dict:
    """How an sft (or preference) run renders chat beyond its template, as tokenize_records and evaluation.score
    take it."""
    return {"chat_template_kwargs": cfg.data.chat_template_kwargs, "reasoning": cfg.data.reasoning}


def tool_rendering(records: list[dict], template: str | None) -> dict | None:
    """run.json's `tools`: how `template` rendered the tools of these sft records (so the run is served the
    same way), or None when no record involves tools."""
    if template and any("messages" in r and has_tools(r["messages"], r.get("tools")) for r in records):
        return rendering(template)
    return None


def label_list(records: list[dict], task: str) -> list[str]:
    """Sorted label names (classify) or tags (ner, with O first), so ids are stable across runs."""
    if task == "classify":
        return sorted({r["label"] for r in records})
    tags = {t for r in records for t in r["tags"]}
    return ["O"] + sorted(tags - {"O"})


def build_features(cfg: TrainConfig, tokenizer, records: list[dict], labels: list[str] | None, source: str):
    """Model inputs for one split. sft: input ids + loss-masked labels (packed into rows when asked); preference:
    each reply's (preference_data.py)."""
    if cfg.task in ("sft", "preference"):
        from ..models import load_generation_config

        chat = {"chat_template": cfg.data.chat_template, "generation_config": load_generation_config(cfg.model),
                **sft_chat(cfg)}
        if cfg.task == "preference":
            from .preference_data import build

            return build(cfg, tokenizer, records, source, chat)
        examples, stats = tokenize_records(tokenizer, sft_records(records, cfg), max_length=cfg.max_length,
                                           source=source, **chat)
        return [e.features() for e in examples], stats
    label2id = {label: i for i, label in enumerate(labels)}
    unknown = sorted({r.get("label") for r in records if cfg.task == "classify" and r["label"] not in label2id}
                     | {t for r in records if cfg.task == "ner" for t in r["tags"] if t not in label2id})
    if unknown:
        raise ConfigError(f"{source}: labels {unknown} do not occur in the training data")
    encode = encode_classification if cfg.task == "classify" else encode_tagging
    return encode(tokenizer, records, label2id, cfg.max_length), None


def shares_prefix(cfg: TrainConfig, model) -> bool:
    """Whether this run's batches may compute the tokens their rows share once: an sft batch's common prefix
    (data/packing.SharedPrefixCollator), a preference batch's prompts and system prompt (data/prefix_tree.py, in
    training and in the reference's and held-out scoring). The row's 4-D boolean mask needs sdpa attention (eager
    adds the mask, flash attention ignores it), and prompt and prefix tuning change the sequence the mask
    describes."""
    return (cfg.task in ("sft", "preference") and cfg.share_prefix and not cfg.packing
            and cfg.method.name not in ("prompt", "prefix")
            and getattr(model.config, "_attn_implementation", None) == "sdpa")


def collator(cfg: TrainConfig, tokenizer, *, share: bool = False):
    """The Trainer's collator; `share`: sft batches share their common prefix (see `shares_prefix`)."""
    from ..data.packing import PackedCollator, PaddingCollator, SharedPrefixCollator

    if cfg.task == "sft":  # preference batches stay padded: the model runs on their prefix tree (loss.py)
        if cfg.packing:
            return PackedCollator(tokenizer.pad_token_id)
        return (SharedPrefixCollator if share else PaddingCollator)(tokenizer.pad_token_id)
    if cfg.task == "preference":
        from .preference_data import PreferenceCollator

        return PreferenceCollator(tokenizer.pad_token_id)
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if cfg.task == "classify":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForTokenClassification(tokenizer)


class LengthGroupedSampler:
    """Training order with batches of similar length: less padding, so more of each step's arithmetic is real
    tokens (the demo chat data, 123-184 tokens per example: 10 % of a randomly batched step is padding, 1.6 %
    here). The examples are shuffled, cut into windows of up to 50 batches (at most a quarter of the data, as
    transformers' LengthGroupedSampler does), sorted by length within each window and cut into batches; then the
    order of the batches is shuffled (transformers' sampler keeps each window's batches from longest to shortest
    instead: a length curriculum inside every window). A partial batch, if any, comes last so every batch keeps
    its examples. Each epoch draws a new order from (seed, epoch), so a resumed run replays the same one."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch

        n, size = len(self.lengths), self.batch_size
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        span = size * max(1, min(n // (4 * size), 50))
        full, partial = [], []
        for start in range(0, n, span):
            window = sorted(order[start:start + span], key=self.lengths.__getitem__)
            for i in range(0, len(window), size):
                (full if len(window[i:i + size]) == size else partial).append(window[i:i + size])
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return iter([index for batch in shuffled + partial for index in batch])

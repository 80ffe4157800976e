"""Batching for training: `PaddingCollator` pads one example per row; `pack` + `PackedCollator` put several
short examples in one row without any attention or position leaking between them.

A packed row is the examples concatenated, with `position_ids` restarting at 0 for each one and NO
attention_mask. transformers 5 (`masking_utils._preprocess_mask_arguments` → `find_packed_sequence_indices`)
reads each restart as a new segment and makes eager/sdpa attention block-diagonal, but only when
attention_mask is None AND there is no KV cache. Llama-style models build a `DynamicCache` whenever
`use_cache` is true, and it defaults to `config.use_cache` (True), even in training mode: call
`prepare_model_for_packing(model)` or every example silently attends to the ones before it (the bug behind
TRL #3067, Axolotl #1375, LLaMA-Factory #8277).

`SharedPrefixCollator` is the other way to waste less: when every example of a batch begins with the same
tokens (a system prompt, the tool definitions every tool-calling example carries: ~330 of the tools demo's
~420 tokens), the batch becomes ONE row, the shared prefix once and then each example's own tokens, with a
4-D attention mask (each example sees the prefix and itself, never another example) and each example's own
positions. Every token sees exactly what it sees in a padded batch, so losses and gradients are equal (tested);
the prefix is computed once instead of once per example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .tokenize import IGNORE_INDEX, common_prefix


def pack(examples: Sequence[Mapping], max_length: int) -> list[dict[str, list[int]]]:
    """Pack {"input_ids", "labels"} examples into rows of at most `max_length` tokens, first-fit decreasing.

    Deterministic: examples are placed longest first, ties in input order; rows come in the order they were
    opened and hold their examples in placement order. Each row is {"input_ids", "labels", "position_ids"}.
    An example longer than `max_length` is an error: truncate first (`tokenize_records(max_length=...)`).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    lengths = [_checked_length(n, example, max_length) for n, example in enumerate(examples, start=1)]
    positions = list(range(max_length))  # sliced per example, so every row shares these int objects
    rows = []
    for members in _first_fit_decreasing(lengths, max_length):
        input_ids, labels, position_ids = [], [], []
        for i in members:
            # The first token's label is what the previous example's last token would be trained to predict
            # (the model shifts labels left by one). Unpacked, that label is never used, so -100 is lossless;
            # DataCollatorWithFlattening does the same (`[separator_id] + labels[1:]`).
            labels += examples[i]["labels"]
            labels[len(input_ids)] = IGNORE_INDEX
            input_ids += examples[i]["input_ids"]
            position_ids += positions[:lengths[i]]
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return rows


def _checked_length(n: int, example: Mapping, max_length: int) -> int:
    length = len(example["input_ids"])
    if len(example["labels"]) != length:
        raise ValueError(f"example {n} has {length} input ids but {len(example['labels'])} labels; "
                         "they must line up one to one")
    if length == 0:
        raise ValueError(f"example {n} has no tokens; drop empty examples before packing")
    if length > max_length:
        raise ValueError(f"example {n} has {length} tokens, more than max_length={max_length}; truncate "
                         f"examples to max_length before packing (tokenize_records(..., max_length={max_length}))")
    return length


def _first_fit_decreasing(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of the examples in each row. O(n log n) time and O(n) memory: a max-tree over the free space
    of the rows finds the leftmost row with room in one descent, instead of scanning every open row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable: ties keep input order
    size = 1
    while size < len(lengths):
        size *= 2
    # Heap layout: node k has children 2k and 2k+1; leaf `size + r` is the free space of row r. Rows not yet
    # opened have max_length free, so the leftmost fitting leaf is an open row or the next row to open.
    free = [max_length] * (2 * size)
    rows: list[list[int]] = []
    for i in order:
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= lengths[i]
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return rows


def packing_efficiency(rows: Sequence[Mapping], max_length: int) -> float:
    """Fraction of the `len(rows) * max_length` token slots that hold real tokens (1.0 = no padding)."""
    if not rows:
        return 0.0
    return sum(len(row["input_ids"]) for row in rows) / (len(rows) * max_length)


def prepare_model_for_packing(model):
    """Turn off the KV cache, which would otherwise disable the per-example attention of packed rows."""
    model.config.use_cache = False
    return model


@dataclass
class PackedCollator:
    """Data collator for rows from `pack`: right-pads to the longest row and returns input_ids, labels and
    position_ids, each (batch, longest), with no attention_mask (a mask would switch packing detection off).

    Padding gets positions 0, 1, 2, ... so it forms a segment of its own: real tokens never attend to it and
    it never attends to real tokens; its labels are -100, so it adds nothing to the loss."""

    pad_token_id: int

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            pad = longest - len(row["input_ids"])
            batch["input_ids"].append([*row["input_ids"], *[self.pad_token_id] * pad])
            batch["labels"].append([*row["labels"], *[IGNORE_INDEX] * pad])
            batch["position_ids"].append([*row["position_ids"], *range(pad)])
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


@dataclass
class PaddingCollator:
    """Data collator for unpacked {"input_ids", "labels"} examples: right-pads to the longest one and returns
    input_ids, labels (-100 on padding) and attention_mask (1 real, 0 padding), each (batch, longest)."""

    pad_token_id: int

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        from ..batching import pad

        input_ids, attention_mask = pad([e["input_ids"] for e in examples], self.pad_token_id)
        labels, _ = pad([e["labels"] for e in examples], IGNORE_INDEX, width=input_ids.shape[1])
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


MIN_SHARED = 32  # shared tokens worth a row of their own; fewer: pad as usual
MAX_SHARED_ROW = 4096  # the mask is row x row: at most 16 MB of booleans, and attention's waste stays small


def shared_prefix(examples: Sequence[Mapping]) -> int:
    """How many leading tokens every example has in common and may share: the common prefix of their input
    ids, ending before each example's first learnable token and its predecessor (the last shared token must
    predict nothing: in the shared row it sits before the first example's own tokens only) and leaving each
    example at least one token of its own."""
    first = examples[0]["input_ids"]
    shared = min(len(e["input_ids"]) for e in examples) - 1
    for e in examples:
        ids, labels = e["input_ids"], e["labels"]
        learned = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        shared = min(shared, learned - 1, common_prefix(list(ids), list(first)))
    return max(shared, 0)


def shared_tokens(examples: Sequence[Mapping], batch_size: int) -> int:
    """The tokens an epoch of `examples` costs in batches of `batch_size` when the prefix that ALL of them
    share is computed once per batch (an upper bound: a batch may share more)."""
    total = sum(len(e["input_ids"]) for e in examples)
    if len(examples) < 2 or batch_size < 2:
        return total
    prefix = shared_prefix(examples)
    if prefix < MIN_SHARED:
        return total
    batches = -(-len(examples) // batch_size)
    return total - (len(examples) - batches) * prefix


@dataclass
class SharedPrefixCollator:
    """Data collator for unpacked {"input_ids", "labels"} examples: one row [prefix, own tokens of example 1, own
    tokens of example 2, ...] with position_ids and a (1, 1, L, L) boolean attention mask (True: may attend)
    when the batch shares at least MIN_SHARED tokens (`shared_prefix`) and the row stays within `max_row`;
    otherwise a right-padded batch as `PaddingCollator` makes.

    The first own token of every example is not learnable (`shared_prefix` ends before it), so the row's label
    shift never asks one example's last token to predict the next example's first."""

    pad_token_id: int
    max_row: int = MAX_SHARED_ROW

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        prefix = shared_prefix(examples) if len(examples) > 1 else 0
        length = prefix + sum(len(e["input_ids"]) - prefix for e in examples)
        if prefix < MIN_SHARED or length > self.max_row:
            return PaddingCollator(self.pad_token_id)(examples)
        ids, labels = list(examples[0]["input_ids"][:prefix]), [IGNORE_INDEX] * prefix
        positions = list(range(prefix))
        mask = torch.zeros(length, length, dtype=torch.bool)
        mask[:prefix, :prefix] = torch.ones(prefix, prefix, dtype=torch.bool).tril()
        for e in examples:
            start, own = len(ids), len(e["input_ids"]) - prefix
            ids += e["input_ids"][prefix:]
            labels += e["labels"][prefix:]
            positions += range(prefix, prefix + own)
            mask[start:start + own, :prefix] = True
            mask[start:start + own, start:start + own] = torch.ones(own, own, dtype=torch.bool).tril()
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "attention_mask": mask[None, None]}

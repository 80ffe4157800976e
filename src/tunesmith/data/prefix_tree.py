"""A padded batch as one row holding each distinct token prefix once (a prefix tree, "trie"), for the forward passes
of preference training and scoring: a pair's chosen and rejected rows repeat their whole prompt, and the rows of a
data set often begin with the same system prompt, yet a padded batch computes every row in full.

The sequences are sorted lexicographically; each one's longest common prefix with its predecessor is its longest
with any earlier sequence, so its tokens past that are new to the tree and are appended to the row. Every token of
the row attends to its ancestors and itself only (a 4-D boolean mask) at its depth as position: it sees exactly
what it sees in its own padded row, so its hidden state is the same, and each real token (b, t) of the batch reads
its own from the row through `index`. A position several sequences share (their prompt, and the first tokens of two
replies that begin alike: `{"intent": "`) is computed once, and its gradient is the sum of theirs, as the padded
batch's copies would sum into the weights.

Unlike `packing.SharedPrefixCollator` (sft: one prefix common to the whole batch, the labels laid out in the row),
the batch keeps its padded shape for everything after the model: only the hidden states come from the row. The
mask needs sdpa attention (eager adds it, flash attention ignores it): `training.data.shares_prefix` decides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .packing import MAX_SHARED_ROW
from .tokenize import common_prefix

WORTH = 0.8  # a row of at most this fraction of the batch's real tokens; above it, the padded batch is as good


@dataclass
class PrefixTree:
    """The row of a batch [B, T]: `input_ids` and `position_ids` [1, L], `attention_mask` [1, 1, L, L] (True: may
    attend), and `index` [B, T]: the row position of each real token of the batch, -1 on padding."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor

    def inputs(self) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for the row."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask}

    def kept(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep [1, L]: the row positions that some True (b, t) of `mask` [B, T] maps to, a boolean
        `logits_to_keep`; pick [N]: for each True (b, t) in row-major order, its place among the kept positions),
        so that `row_output[pick]` is the padded batch's `output[mask]`."""
        rows = self.index[mask]  # [N] row positions, in (b, t) row-major order; repeats where sequences share
        keep = torch.zeros(self.input_ids.shape[1], dtype=torch.bool, device=rows.device)
        keep[rows] = True
        return keep[None], (keep.cumsum(0) - 1)[rows]


def _paths(sequences: list[list[int]]) -> tuple[list[int], list[int], list[tuple[list[int], int]]]:
    """(the row's token ids, their depths, per sequence (its row positions, how many of them it shares with an
    earlier sequence in the sort))."""
    ids, depths, paths = [], [], [([], 0)] * len(sequences)
    previous, previous_path = [], []
    for b in sorted(range(len(sequences)), key=sequences.__getitem__):
        sequence = sequences[b]
        shared = common_prefix(previous, sequence)
        path = previous_path[:shared] + list(range(len(ids), len(ids) + len(sequence) - shared))
        ids += sequence[shared:]
        depths += range(shared, len(sequence))
        paths[b] = (path, shared)
        previous, previous_path = sequence, path
    return ids, depths, paths


def prefix_tree(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_row: int = MAX_SHARED_ROW,
                worth: float = WORTH) -> PrefixTree | None:
    """The prefix-tree row of a padded batch (`input_ids` and `attention_mask` [B, T]; a row's real tokens are
    those its mask marks, in order, so right and left padding alike), on the batch's device; None when the row
    would save too little (more than `worth` x the real tokens) or exceed `max_row` tokens (the mask is L x L).
    Positions count from each sequence's first real token, as a right-padded batch numbers them."""
    real = attention_mask.detach().bool().cpu()
    tokens = input_ids.detach().cpu()
    sequences = [tokens[b][real[b]].tolist() for b in range(len(tokens))]
    if len(sequences) < 2:
        return None
    ids, depths, paths = _paths(sequences)
    length = len(ids)
    if length > max_row or length > worth * sum(map(len, sequences)):
        return None
    mask = torch.zeros(length, length, dtype=torch.bool)
    index = torch.full(tokens.shape, -1, dtype=torch.long)
    for b, (path, shared) in enumerate(paths):
        where = torch.tensor(path, dtype=torch.long)
        index[b, real[b]] = where
        if len(path) > shared:  # its own tokens see the path up to themselves (the shared ones were set before)
            own = torch.ones(len(path), len(path), dtype=torch.bool).tril()[shared:]
            mask[where[shared:, None], where[None, :]] = own
    device = input_ids.device
    return PrefixTree(torch.tensor([ids], device=device), torch.tensor([depths], device=device),
                      mask[None, None].to(device), index.to(device))


def tree_tokens(groups: Sequence[Sequence[list[int]]], batch_size: int, *, max_row: int = MAX_SHARED_ROW,
                worth: float = WORTH) -> int:
    """The tokens an epoch costs when each batch of `batch_size` groups (a group: the sequences of one example that
    go through the model together, a pair's chosen and rejected) runs on its prefix tree, or on its real tokens
    where `prefix_tree` would pad. Counted on the groups in their order, batch by batch: training draws other
    batches, which may share a little more or less."""
    total = 0
    for start in range(0, len(groups), batch_size):
        sequences = [list(s) for group in groups[start:start + batch_size] for s in group]
        real = sum(map(len, sequences))
        length = len(_paths(sequences)[0]) if len(sequences) > 1 else real
        total += length if length <= max_row and length <= worth * real else real
    return total

"""The causal-LM training loss with the output layer applied only where there is something to learn.

Only ~14 % of the demo's tokens carry labels, yet the plain loss projects every position onto the 49,152-token
vocabulary, keeps those logits [B, T, V] for the backward pass and back-propagates through all of them. Here the
hidden states of the positions whose next token is learnable, and only those, go through the LM head
(transformers' boolean `logits_to_keep`: hidden[mask] -> [N, H] -> logits [N, V]), so the logits are N x V with
N the learnable tokens of the batch. Even those logits never exist at once: the head and the cross-entropy run
on chunks of ~8 MB of logits each ([n, V], n = 42 rows for SmolLM2's vocabulary) under activation checkpointing,
so the backward pass recomputes a chunk's logits instead of keeping them (~100 MB less at the peak of a demo
step: logits, log-softmax and their gradient, for one more pass of the head). The loss is the same sum of
cross-entropies divided the same way (`num_items_in_batch` when the Trainer gives it, else the mean), so values
and gradients equal the plain loss (tested, packed rows and chunks included).

Applies to causal LMs trained through their own forward (full, freeze, LoRA-family adapters); prompt and prefix
tuning change the sequence peft feeds the model, so they keep the plain loss. The preference objectives
(preference.py) take the same path: `token_log_probs` gives the log-probabilities of the labelled tokens of the
chosen and rejected replies, in TRL's shape, with the head on those positions alone, and the model run once on
each distinct prefix of the batch (their shared prompt) where the prefix tree saves enough."""

from __future__ import annotations

IGNORE = -100


def labelled_positions(labels):
    """(mask [B, T] of the positions whose *next* token is learnable, their targets [N]), row-major alike."""
    import torch.nn.functional as F

    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position t predicts token t + 1
    mask = shifted != IGNORE
    return mask, shifted[mask]


CHUNK_BYTES = 8 * 1024 ** 2  # fp32 logits per chunk of the head + cross-entropy


def _head_loss(head, hidden, targets):
    """Summed cross-entropy of one chunk: hidden [n, H] through the LM head to logits [n, V]."""
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _labelled_hidden(model, inputs: dict, mask):
    """(final hidden states of the positions in `mask` [N, H], the LM head, the model's outputs): the forward goes
    through `model` itself (a data-parallel wrapper must see it) with the head set aside for the call, so what comes
    out as "logits" is the hidden state of the masked positions only (a boolean `logits_to_keep`)."""
    from torch import nn

    inner = model.module if hasattr(model, "module") else model  # data-parallel wrapper
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(nn.Identity())
    try:
        outputs = model(**inputs, logits_to_keep=mask)
    finally:
        inner.set_output_embeddings(head)
    hidden, outputs.logits = outputs.logits, None
    return hidden, head, outputs


def _chunk_rows(head, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, CHUNK_BYTES // (4 * head.weight.shape[0]))


def labelled_only_loss(model, inputs: dict, num_items_in_batch=None, *, chunk_rows: int | None = None):
    """(loss, outputs) of `model` on `inputs` (with "labels"), the LM head run on learnable positions only, in
    chunks of `chunk_rows` positions (default: ~CHUNK_BYTES of fp32 logits). `outputs.logits` is None."""
    import torch
    from torch.utils.checkpoint import checkpoint

    inputs = dict(inputs)
    mask, targets = labelled_positions(inputs.pop("labels"))
    hidden, head, outputs = _labelled_hidden(model, inputs, mask)
    rows = _chunk_rows(head, chunk_rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for part, part_targets in zip(hidden.split(rows), targets.split(rows)):
        total = total + checkpoint(_head_loss, head, part, part_targets, use_reentrant=False)
    loss = total / (num_items_in_batch if num_items_in_batch is not None else max(len(targets), 1))
    return loss, outputs


def _head_log_probs(head, hidden, targets):
    """One chunk: (log-probability of each target [n], and without gradient its distribution's entropy, mean
    logit and whether the target is the most likely token [n, 3])."""
    import torch

    logits = head(hidden).float()
    log_probs = logits.log_softmax(-1)
    picked = log_probs.gather(1, targets[:, None])[:, 0]
    with torch.no_grad():
        stats = torch.stack([-(log_probs.exp() * log_probs).sum(-1), logits.mean(-1),
                             (logits.argmax(-1) == targets).float()], dim=1)
    return picked, stats


TREE_INPUTS = {"input_ids", "attention_mask", "use_cache"}  # a batch the prefix-tree row can stand in for


def _tree_hidden(model, inputs: dict, mask):
    """_labelled_hidden of the padded batch `inputs`, computed on its prefix-tree row (data/prefix_tree.py: each
    distinct prefix once) when that saves enough: the row's states gathered back to [N, H] in the (b, t) row-major
    order of `mask`, so a state several sequences share is computed once and its gradient sums theirs."""
    from ..data.prefix_tree import prefix_tree

    tree = prefix_tree(inputs["input_ids"], inputs["attention_mask"]) if inputs.keys() <= TREE_INPUTS else None
    if tree is None:
        return _labelled_hidden(model, inputs, mask)
    keep, pick = tree.kept(mask)
    hidden, head, outputs = _labelled_hidden(model, {**inputs, **tree.inputs()}, keep)
    return hidden[pick], head, outputs


def token_log_probs(model, inputs: dict, labels, *, chunk_rows: int | None = None, share: bool = False) -> dict:
    """Per-token log-probabilities of the labelled next tokens, the LM head run on those positions only (chunked and
    recomputed in the backward pass, as the loss above), in the shape of TRL's fused LM head output
    (trl.trainer.utils.FusedCausalLMOutput): "log_probs", "entropy", "mean_logits" and "is_top1", each [B, T-1]
    (position t: the token at t + 1), zero where the label is -100; only "log_probs" carries a gradient. `share`:
    the model runs on the batch's prefix-tree row where that saves enough (training/data.shares_prefix says when
    the model allows it); the values and gradients are the padded batch's."""
    import torch
    from torch.utils.checkpoint import checkpoint

    mask, targets = labelled_positions(labels)
    hidden, head, _ = (_tree_hidden if share else _labelled_hidden)(model, inputs, mask)
    rows = _chunk_rows(head, chunk_rows)
    picked, stats = [], []
    for part, part_targets in zip(hidden.split(rows), targets.split(rows)):
        p, s = checkpoint(_head_log_probs, head, part, part_targets, use_reentrant=False)
        picked.append(p)
        stats.append(s)
    out = {}
    for name, values in (("log_probs", torch.cat(picked) if picked else hidden.new_zeros(0)),
                         *zip(("entropy", "mean_logits", "is_top1"),
                              torch.cat(stats).unbind(1) if stats else [hidden.new_zeros(0)] * 3)):
        # masked_scatter keeps an all-masked batch connected to the model: a zero with a gradient (as TRL does)
        out[name] = hidden.new_zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, values.float())[:, :-1]
    out["is_top1"] = out["is_top1"].bool()
    return out


def supports_labelled_only(model, cfg) -> bool:
    """Whether this run's model takes a boolean `logits_to_keep` on its own sequence: a causal LM trained
    through its forward (sft, not prompt/prefix tuning)."""
    import inspect

    if cfg.task != "sft" or cfg.method.name in ("prompt", "prefix"):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters

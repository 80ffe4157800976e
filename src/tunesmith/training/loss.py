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
tuning change the sequence peft feeds the model, so they keep the plain loss."""

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


def labelled_only_loss(model, inputs: dict, num_items_in_batch=None, *, chunk_rows: int | None = None):
    """(loss, outputs) of `model` on `inputs` (with "labels"), the LM head run on learnable positions only, in
    chunks of `chunk_rows` positions (default: ~CHUNK_BYTES of fp32 logits). `outputs.logits` is None."""
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    mask, targets = labelled_positions(labels)
    inner = model.module if hasattr(model, "module") else model  # data-parallel wrapper
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = inner.get_output_embeddings()
    # The forward goes through `model` itself (a data-parallel wrapper must see it) with the head set aside for
    # the call, so what comes out as "logits" is the final hidden state of the learnable positions, [N, H].
    inner.set_output_embeddings(nn.Identity())
    try:
        outputs = model(**inputs, logits_to_keep=mask)
    finally:
        inner.set_output_embeddings(head)
    hidden, outputs.logits = outputs.logits, None
    rows = chunk_rows or max(1, CHUNK_BYTES // (4 * head.weight.shape[0]))
    total = hidden.new_zeros((), dtype=torch.float32)
    for part, part_targets in zip(hidden.split(rows), targets.split(rows)):
        total = total + checkpoint(_head_loss, head, part, part_targets, use_reentrant=False)
    loss = total / (num_items_in_batch if num_items_in_batch is not None else max(len(targets), 1))
    return loss, outputs


def supports_labelled_only(model, cfg) -> bool:
    """Whether this run's model takes a boolean `logits_to_keep` on its own sequence: a causal LM trained
    through its forward (sft, not prompt/prefix tuning)."""
    import inspect

    if cfg.task != "sft" or cfg.method.name in ("prompt", "prefix"):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters

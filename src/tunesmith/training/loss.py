"""The causal-LM training loss with the output layer applied only where there is something to learn.

Only ~14 % of the demo's tokens carry labels, yet the plain loss projects every position onto the 49,152-token
vocabulary, keeps those logits [B, T, V] for the backward pass and back-propagates through all of them. Here the
hidden states of the positions whose next token is learnable, and only those, go through the LM head
(transformers' boolean `logits_to_keep`: hidden[mask] -> [N, H] -> logits [N, V]), so the logits are N x V with
N the learnable tokens of the batch. The loss is the same sum of cross-entropies divided the same way
(`num_items_in_batch` when the Trainer gives it, else the mean), so values and gradients equal the plain loss
(tested, packed rows included).

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


def labelled_only_loss(model, inputs: dict, num_items_in_batch=None):
    """(loss, outputs) of `model` on `inputs` (with "labels"), the LM head run on learnable positions only."""
    import torch.nn.functional as F

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    mask, targets = labelled_positions(labels)
    outputs = model(**inputs, logits_to_keep=mask)
    logits = outputs.logits  # [N, V]
    if num_items_in_batch is None:
        loss = F.cross_entropy(logits.float(), targets, reduction="mean")
    else:
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / num_items_in_batch
    return loss, outputs


def supports_labelled_only(model, cfg) -> bool:
    """Whether this run's model takes a boolean `logits_to_keep` on its own sequence: a causal LM trained
    through its forward (sft, not prompt/prefix tuning)."""
    import inspect

    if cfg.task != "sft" or cfg.method.name in ("prompt", "prefix"):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters

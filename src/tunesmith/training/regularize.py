"""Regularisation toward the parent run's weights, for continual learning without replay.

- L2-SP (Li, Grandvalet & Davoine 2018): penalty = strength * sum_i (w_i - w*_i)^2 over the trainable weights,
  w* their values in the parent run (where this run starts).
- EWC (Kirkpatrick et al. 2017): penalty = strength * sum_i F_i (w_i - w*_i)^2, F the diagonal empirical Fisher
  of the parent's task: the mean over `fisher_samples` of the parent's training examples (one at a time) of the
  squared gradient of the loss, estimated before this run's first step.

The penalty is added to every micro-batch's loss (RunTrainer.compute_loss), so gradient accumulation scales it
like the loss itself."""

from __future__ import annotations

import random


class Anchor:
    """The parent's trainable weights w* (copies) and their per-weight importances (1 for L2-SP, F for EWC)."""

    def __init__(self, model, strength: float, importance: dict | None = None):
        self.strength = strength
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.anchor = {n: params[n].detach().clone() for n in self.names}
        self.importance = importance  # None: every weight counts 1 (L2-SP)

    def penalty(self, model):
        """strength * sum importance * (w - w*)^2 over the trainable weights: a scalar tensor in the graph."""
        params = dict(model.named_parameters())
        total = 0.0
        for n in self.names:
            diff = (params[n] - self.anchor[n].to(params[n].device)) ** 2
            total = total + (diff * self.importance[n].to(diff.device) if self.importance else diff).sum()
        return self.strength * total


def fisher_diagonal(model, features: list[dict], collate, samples: int, seed: int) -> dict:
    """Mean squared gradient of the loss per trainable weight over `samples` seeded examples (batch 1)."""
    import torch

    rng = random.Random(seed)
    chosen = rng.sample(features, min(samples, len(features)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    was_training = model.training
    model.eval()  # no dropout in the estimate
    device = next(model.parameters()).device
    for feature in chosen:
        batch = {k: v.to(device) for k, v in collate([feature]).items()}
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n in names:
            if params[n].grad is not None:
                fisher[n] += params[n].grad.detach() ** 2 / len(chosen)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return fisher


def anchor_for(cfg, model, parent_features: list[dict] | None, collate) -> Anchor | None:
    """The Anchor this config asks for (None without regularization)."""
    reg = cfg.regularization
    if reg is None:
        return None
    importance = None
    if reg.kind == "ewc":
        importance = fisher_diagonal(model, parent_features, collate, reg.fisher_samples, cfg.seed)
    return Anchor(model, reg.strength, importance)

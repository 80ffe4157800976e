"""How fast this machine trains this run: one step timed before training, so that a default plan on a CPU fits
its time (defaults.CPU_SECONDS) on the machine it runs on: a 2-core AVX2 CPU trains in fp32 at a third or less of
the speed of one with bf16 units, and a prefix shared by the batch, recompute or a bigger vocabulary change the cost
of a token again. The step is the run's own: its first batch, its model as prepared (method, precision, recompute),
its loss; its gradients are dropped and the random state put back, so the run trains as it would have."""

from __future__ import annotations

import time

from .defaults import Speed


def batch_tokens(batch: dict) -> int:
    """The tokens a collated batch trains on: real tokens of a padded batch; every token of a shared-prefix or
    packed row (a shared row has no padding; a packed row's padding is at most one short example)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def time_one_step(trainer, features: list[dict], batch_size: int) -> Speed:
    """Forward and backward of the run's loss on `features[:batch_size]`, timed after one untimed pass (the first
    builds kernels and fills the allocator)."""
    import torch

    examples = features[:batch_size]
    batch = trainer.data_collator(examples)
    model = trainer.model
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    state, was_training = torch.get_rng_state(), model.training
    model.train()
    try:
        for _ in range(2):
            started = time.perf_counter()
            trainer.compute_loss(model, batch).backward()
            seconds = time.perf_counter() - started
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(state)
        model.train(was_training)
    return Speed(seconds=seconds, tokens=batch_tokens(batch), examples=len(examples))

"""How fast this machine trains this run: one step timed before training, so that a default plan on a CPU fits
its time (defaults.CPU_SECONDS) on the machine it runs on: a 2-core AVX2 CPU trains in fp32 at a third or less of
the speed of one with bf16 units, and a prefix shared by the batch, recompute or a bigger vocabulary change the cost
of a token again. The step is the run's own: its first batch, its model as prepared (method, precision, recompute),
its loss; its gradients are dropped and the random state put back, so the run trains as it would have."""

from __future__ import annotations

import time

from .defaults import Speed


def time_one_step(trainer, examples: list[dict], tokens: int) -> Speed:
    """Forward and backward of the run's loss on the batch of `examples`, timed after one untimed pass (the first
    builds kernels and fills the allocator). `tokens`: what the batch costs, counted as the plan counts an
    epoch's (a prefix its rows share once: a preference batch is collated padded and shares its prompts only in
    the loss, so its padded size would overstate the speed several times)."""
    import torch

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
    return Speed(seconds=seconds, tokens=tokens, examples=len(examples))

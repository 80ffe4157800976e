"""The one padding helper for inference batches (evaluation, prompting, batched generation) and training
collators: rows of token ids to a rectangular tensor and its attention mask, on the model's device.

Right padding suits scoring (each row's tokens keep their positions from 0); left padding suits generation
(every prompt ends in the last column, so new tokens line up across the batch)."""

from __future__ import annotations

from typing import Literal


def pad(rows: list[list[int]], value: int, *, side: Literal["right", "left"] = "right", device=None,
        width: int | None = None):
    """(ids, mask): `rows` padded with `value` to `width` (default: the longest row), both (batch, width)
    long tensors on `device`; mask is 1 on real tokens, 0 on padding."""
    import torch

    width = max((len(r) for r in rows), default=0) if width is None else width
    if side == "right":
        ids = [list(r) + [value] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    else:
        ids = [[value] * (width - len(r)) + list(r) for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.long, device=device))


def batches(features: list[dict], size: int, pad_id: int, *, device=None, progress=None):
    """(chunk, ids, mask) for each run of `size` features, right-padded on `device`; `progress` (a
    progress.Progress) advances by each chunk's size."""
    for start in range(0, len(features), size):
        chunk = features[start:start + size]
        ids, mask = pad([f["input_ids"] for f in chunk], pad_id, device=device)
        yield chunk, ids, mask
        if progress is not None:
            progress.update(len(chunk))


def device_of(model):
    """The device a model's inputs belong on (its first parameter's; CPU for a parameterless stub)."""
    import torch

    device = getattr(model, "device", None)
    if device is not None:
        return device
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")

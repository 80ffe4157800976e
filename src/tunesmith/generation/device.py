"""Where the engine runs: the model's device. `place` puts a model on the device a user asked for (`--device
auto|cpu|cuda`), in bfloat16 on a GPU (float16 where bfloat16 is not supported) and float32 on the CPU."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto"):
    """The torch.device for a `--device` value: auto means CUDA when a GPU is visible, else the CPU."""
    import torch

    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        from ..errors import UsageError

        raise UsageError(f"device {name!r}: use one of {', '.join(DEVICES)} (or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import UsageError

        raise UsageError(f"--device {name}: no CUDA GPU is visible to torch on this machine; use --device cpu or auto")
    return torch.device(name)


def place(model, device: str = "auto"):
    """`model` moved to `device` (see resolve_device), half precision on a GPU. Models already there are
    left alone; quantized or half-precision weights keep their dtype."""
    import torch

    target = resolve_device(device)
    try:
        current = next(model.parameters())
    except StopIteration:
        return model
    dtype = None
    if target.type == "cuda" and current.dtype == torch.float32:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if current.device == target and dtype is None:
        return model
    return model.to(device=target, dtype=dtype) if dtype is not None else model.to(target)

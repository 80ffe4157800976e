"""Frozen weights in bfloat16: the adapter methods' speed lever on hardware that multiplies bf16 natively.

A LoRA run trains a few million adapter weights on top of a base model it never changes. The base's linear layers
do almost all of a step's arithmetic (forward, and the input gradient in the backward pass), and on a CPU with
AMX-BF16 or AVX512-BF16 (Sapphire Rapids and later) or a CUDA GPU with bf16 tensor cores a bf16 matrix product
runs several times faster than an fp32 one (this project's 2-core Xeon: ~110 fp32 vs ~520 bf16 GFLOP/s on one
core). So with `precision: bf16` the frozen base linears hold their weights in bf16 and multiply in bf16; their
inputs are cast on the way in and their outputs cast back, so everything else (the residual stream, the norms,
the adapter weights and their gradients, the optimizer state, the loss) stays fp32. Unlike loading the whole model
in bf16, an adapter's small early updates are not rounded away when they are added to the base's output (that
rounding slowed the first steps when measured: SmolLM2 LoRA on the demo chat data, loss 0.74 after 6 steps with
the whole model in bf16 against 0.54 in fp32 and 0.54 with only the base linears in bf16; tests/test_precision.py
shows the rounding on one layer).

Only adapter methods whose base layers are plain frozen `nn.Linear`s are lowered (LoRA and rsLoRA; not DoRA,
which reads the base weight to normalise its update): their saved artifact is the adapter alone, so the bf16
copy never reaches a file. Before the run is saved and scored, `restore_frozen_linears` puts the base's own fp32
weights back, so the "after" scores are those of the run as a user loads it (fp32 base + the adapter).
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import bf16_lowerable


class Bf16FrozenLinear(nn.Linear):
    """An nn.Linear whose (frozen) weight is bf16: the input is cast to bf16 for the product and the output
    back to the input's dtype. Installed by swapping the class of an existing layer (state dict keys unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


class Bf16FrozenEmbedding(nn.Embedding):
    """An nn.Embedding whose (frozen) table is bf16: rows are looked up in bf16 and handed on as `out_dtype`
    (the model's own dtype), so the residual stream stays fp32. Installed by swapping the class, like
    Bf16FrozenLinear."""

    out_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)


def bf16_native(device: str) -> bool:
    """Whether `device` ("cpu" or "cuda") multiplies bf16 matrices natively (faster than fp32)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, probe, lambda: False)() for probe in probes)


def choose(method, device: str) -> tuple[str, str]:
    """What `precision: auto` means for this method on `device`: ("bf16" or "fp32", the reason in one line)."""
    if not bf16_lowerable(method):
        why = "DoRA reads the base weights" if method.name == "lora" else f"{method.name} trains or reads them"
        return "fp32", f"precision fp32: base weights stay fp32 ({why}; bf16 applies to LoRA's frozen base)"
    if bf16_native(device):
        where = "this GPU" if device == "cuda" else "this CPU (AMX/AVX512-BF16)"
        return "bf16", (f"precision bf16: frozen base weights in bfloat16, {where} multiplies bf16 natively; "
                        "adapter, activations and loss stay fp32 (precision: fp32 turns it off)")
    return "fp32", "precision fp32: this machine has no native bf16 matrix unit"


def lower_frozen_linears(model) -> list[str]:
    """Put the frozen base of a PEFT model in bf16 (see the module docstring): the base layers of its LoRA
    layers, and the token embedding and output layer (often one tied matrix: 49,152 x 576 in SmolLM2, 113 MB in
    fp32) when they are frozen. Returns the lowered modules' names in the underlying model
    (`model.get_base_model()`), for `restore_frozen_linears`. Trainable weights are never touched."""
    from peft.tuners.lora import LoraLayer

    lowered = []
    mapped = _file_mappings()
    inner = model.get_base_model()
    for name, module in inner.named_modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(module, LoraLayer) or type(base) is not nn.Linear or base.weight.requires_grad:
            continue
        _lower(base, Bf16FrozenLinear, mapped)
        lowered.append(name)
    if not lowered:
        return lowered
    # The embedding and the head are looked up / multiplied like the base linears, and the head's product runs
    # only on the learnable positions (training/loss.py), so bf16 there costs no more precision than elsewhere.
    names = {id(m): n for n, m in inner.named_modules()}
    for module, cls in ((inner.get_input_embeddings(), Bf16FrozenEmbedding),
                        (inner.get_output_embeddings(), Bf16FrozenLinear)):
        if type(module) not in (nn.Embedding, nn.Linear) or id(module) not in names or module.weight.requires_grad \
                or (getattr(module, "bias", None) is not None and module.bias.requires_grad):
            continue
        if module.weight.dtype != torch.bfloat16:  # a tied head shares the embedding's (already lowered) weight
            _lower(module, cls, mapped)
        module.__class__ = cls
        lowered.append(names[id(module)])
    # The weights left fp32 (norms, adapters) may be views into the mapped checkpoint too, and keep the whole
    # mapping alive: own copies of them (same values) let it go.
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype != torch.bfloat16:
            tensor.data = tensor.data.clone()
    return lowered


def _lower(module, cls, mapped) -> None:
    """Convert one frozen module's weight (and bias) to bf16 in place, hand the fp32 pages back, swap its class."""
    fp32 = module.weight.data
    if cls is Bf16FrozenEmbedding:
        module.out_dtype = fp32.dtype
    module.weight.data = fp32.to(torch.bfloat16)
    _drop_file_pages(fp32, mapped)
    del fp32
    if getattr(module, "bias", None) is not None and not module.bias.requires_grad:
        module.bias.data = module.bias.data.to(torch.bfloat16)
    module.__class__ = cls


def activation_bytes(config, batch_size: int, max_length: int) -> int | None:
    """What a decoder's backward pass keeps per step, at most (every row max_length long), in fp32: per token
    and layer ~5 hidden-sized tensors (norm inputs, attention in/out, the adapters' inputs), 2 key/value-sized and
    4 MLP-sized ones (gate, up, their product, the down projection's input). Measured on SmolLM2 (hidden 576, MLP
    1536, 30 layers, batch 8 x ~150 tokens): 1.7 GB kept, ~9.4k values per token and layer predicted. None for a
    config without these sizes."""
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if not hidden or not layers:
        return None
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or 1
    kv = hidden * (getattr(config, "num_key_value_heads", None) or heads) // heads
    return batch_size * max_length * layers * (5 * hidden + 2 * kv + 4 * mlp) * 4


def free_memory(device: str) -> int | None:
    """Bytes this run can still use: the GPU's free memory, or the machine's available RAM."""
    try:
        if device == "cuda":
            return torch.cuda.mem_get_info()[0]
        import psutil

        return psutil.virtual_memory().available
    except Exception:  # no way to tell: keep the activations (the fast choice)
        return None


RECOMPUTE_SHARE = 0.25  # recompute once the activations would take more than this share of the free memory
SMALL_ACTIVATIONS = 256 * 1024 ** 2  # below this, recomputing them saves too little to pay for the extra pass


def choose_recompute(config, batch_size: int, max_length: int, device: str, weight_bytes: int = 0
                     ) -> tuple[bool, str]:
    """What `recompute` left unset means: recompute the activations in the backward pass (activation
    checkpointing, as TRL's SFTConfig does by default) when keeping them would take more memory than the model's
    weights (and over 256 MB), or over a quarter of the free memory; keep them when they are small beside both.
    Recomputing costs about one more forward pass: SmolLM2 LoRA on this project's 2-core CPU ran ~25 % slower
    with it and peaked at 1.1 GB instead of 2.9 GB (benchmarks/train_vs_trl.py)."""
    need, free = activation_bytes(config, batch_size, max_length), free_memory(device)
    if need is None:
        return False, "recompute off: activations kept (their size could not be estimated)"
    gb = 1024 ** 3
    size = f"the activations (up to ~{need / gb:.1f} GB at batch {batch_size} x {max_length} tokens)"
    if free is not None and need > RECOMPUTE_SHARE * free:
        return True, (f"recompute on: {size} would take over a quarter of the {free / gb:.1f} GB free; "
                      "recomputed in the backward pass instead (recompute: false keeps them)")
    if need > max(weight_bytes, SMALL_ACTIVATIONS):
        return True, (f"recompute on: {size} would outweigh the model's weights ({weight_bytes / gb:.2f} GB); "
                      "recomputed in the backward pass instead, ~25 % slower (recompute: false keeps them)")
    return False, (f"recompute off: {size} are small beside the model's weights and the free memory; "
                   "recompute: true trades ~25 % of the speed for most of their memory")


def recompute_activations(model) -> None:
    """Activation checkpointing: keep only each block's input in the forward pass and recompute the rest during
    the backward pass (non-reentrant, so frozen inputs need no requires_grad trick)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of weight files (/proc/self/maps; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors") and fields[1].endswith("p"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, end))
    return found


def _drop_file_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Release the resident pages of an fp32 weight just converted, when it lives in the private mapping of the
    checkpoint file that transformers loads from (reading every linear to convert it would otherwise pull the
    whole file into this process's resident memory on top of the bf16 copies: the peak of a LoRA run's memory).
    Dropped pages of a private file mapping are re-read from the file if anything touches them again; nothing
    in a run writes into a frozen base weight, so no value can change. Anything else (anonymous memory, a GPU
    tensor) is left alone."""
    if tensor.device.type != "cpu" or not mapped:
        return
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    if not any(start <= begin and end <= stop for start, stop in mapped):
        return
    first, last = -(-begin // page) * page, end // page * page  # whole pages inside the tensor only
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def restore_frozen_linears(model, lowered: list[str], original) -> None:
    """Undo `lower_frozen_linears`: copy the fp32 weights of the same modules from `original` (the base model as
    loaded, e.g. `load_for_task` again) into the lowered ones and give them back their plain classes. A head
    tied to the embedding gets the same (restored) matrix again, still tied."""
    source = dict(original.named_modules())
    target = dict(model.get_base_model().named_modules())
    for name in lowered:
        module = getattr(target[name], "base_layer", target[name])
        fp32 = source[name]
        module.weight.data = fp32.weight.data.to(module.weight.device)
        if getattr(module, "bias", None) is not None and fp32.bias is not None and not module.bias.requires_grad:
            module.bias.data = fp32.bias.data.to(module.bias.device)
        module.__class__ = nn.Embedding if isinstance(module, Bf16FrozenEmbedding) else nn.Linear

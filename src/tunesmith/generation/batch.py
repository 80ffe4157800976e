"""The model side of the engine: how a served model's rows run (`Route`), their prefill, and a `Group` of rows
that decode together, one forward pass per step over one KV cache.

Every row is left-padded: its cache columns are [padding, (virtual tokens), prompt, generated], its attention
mask is 0 on padding, and its position ids count only the columns it attends to (the virtual tokens of prompt
and prefix tuning included, as peft's own forward numbers them). So rows of any lengths share one cache, and
a newly prefilled batch joins a running one by left-padding the narrower of the two caches and concatenating
along the batch: continuous batching on transformers' DynamicCache, with no change to the model.

Which rows may share a forward pass:
- a plain model: all its rows;
- LoRA adapters of one PeftModel and its base: all of them, in one pass with peft's `adapter_names` (one
  adapter name per row, "__base__" for the base) — mixed-adapter batches;
- prompt and prefix tuning: only the prefill needs the adapter (prompt tuning prepends the virtual token
  embeddings; prefix tuning starts the cache with peft's `get_prompt`, the virtual tokens' keys and values);
  every later step is a plain forward of the underlying transformers model over that cache, so these rows
  decode together with each other and with the base rows of the same PeftModel;
- any other adapter type (IA3, ...) runs with its adapter switched on, one adapter per group; the engine
  alternates fairly between groups."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from ..errors import UsageError

# peft prompt-learning types whose virtual tokens this engine knows how to place (by PeftType value)
VIRTUAL = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "prompt"}


@dataclass
class Route:
    """How the rows of one served model run. Rows whose routes have equal `key`s decode in one forward pass."""

    key: tuple
    decoder: object  # what every forward pass calls
    peft: object = None  # the PeftModel whose adapter builds the virtual tokens (prompt/prefix tuning)
    virtual: str | None = None  # "prompt", "prefix" or None
    adapter_name: str | None = None  # this row's entry in peft's adapter_names (LoRA mixed batches)
    prefill_context: Callable = nullcontext  # entered around the prefill (the adapter switched on)
    decode_context: Callable = nullcontext  # entered around every decode step
    signature: frozenset = field(default_factory=frozenset)  # the transformers model's forward arguments


def _forward_arguments(model) -> frozenset:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return frozenset(inspect.signature(base.forward).parameters)


def route(module, adapter: str | None, *, as_is: bool = False, activate: Callable = nullcontext) -> Route:
    """The Route of `module` serving `adapter` (None = the base model), or with `as_is` the module exactly as
    the caller left it (its active adapter, or none inside peft's `disable_adapter()`)."""
    configs = getattr(module, "peft_config", None)
    if not configs:
        return Route((id(module), None), module, signature=_forward_arguments(module))
    if as_is:
        adapter = None if getattr(module, "_adapters_disabled", False) else module.active_adapter
    config = configs.get(adapter) if adapter is not None else None
    base = module.get_base_model()
    if config is not None and config.is_prompt_learning:
        kind = VIRTUAL.get(str(getattr(config.peft_type, "value", config.peft_type)))
        if kind is None:
            raise UsageError(f"{config.peft_type} adapters cannot generate with this engine (it places prefix "
                             "tuning, prompt tuning and p-tuning virtual tokens)")
        return Route((id(base), None), base, peft=module, virtual=kind, signature=_forward_arguments(base),
                     prefill_context=nullcontext if as_is else activate)
    if any(c.is_prompt_learning for c in configs.values()):  # the base of prompt-learning adapters: no adapter
        return Route((id(base), None), base, signature=_forward_arguments(base))
    if as_is:
        return Route((id(module), "as is"), module, signature=_forward_arguments(module))
    from peft.tuners.lora import LoraModel

    if type(module.base_model) is LoraModel:  # exactly LoRA: its layers mix adapters per row
        return Route((id(module), "lora"), module, adapter_name=adapter or "__base__",
                     signature=_forward_arguments(module))
    return Route((id(module), adapter), module, prefill_context=activate, decode_context=activate,
                 signature=_forward_arguments(module))


def _call(route: Route, adapter_names: list[str] | None, *, every_position: bool = False, **inputs):
    """Logits [B, V] of the last position (float32, on the CPU), or with `every_position` [B, T, V] of all,
    on the model's device. The cache goes in as `cache=` where the model takes it (transformers >= 5.24; the
    old name `past_key_values` is deprecated there), else as `past_key_values=`."""
    cache = inputs.pop("cache")
    inputs["cache" if "cache" in route.signature else "past_key_values"] = cache
    if "logits_to_keep" in route.signature and not every_position:
        inputs["logits_to_keep"] = 1  # only the last position is sampled: skip the LM head elsewhere
    if adapter_names is not None:
        inputs["adapter_names"] = adapter_names
    logits = route.decoder(use_cache=True, **inputs).logits
    return logits if every_position else logits[:, -1, :].float().cpu()


def prefill(route: Route, prompts: list[list[int]], adapter_names: list[str] | None, pad_id: int, device, *,
            every_position: bool = False):
    """(cache, mask [B, L], logits [B, V] on the CPU, None) after running left-padded `prompts` through the
    model; with `every_position` the last item is the logits [B, T, V] of the prompt columns (padding first)."""
    import torch
    from transformers import DynamicCache

    from ..batching import pad

    ids, mask = pad(prompts, pad_id, side="left", device=device)  # [B, T] each
    batch = len(prompts)
    cache, inputs = DynamicCache(), {"input_ids": ids}
    with route.prefill_context():
        if route.virtual is not None:
            virtual = route.peft.active_peft_config.num_virtual_tokens
            mask = torch.cat([mask.new_ones(batch, virtual), mask], -1)
            if route.virtual == "prefix":  # the virtual tokens' keys and values start the cache: [B, h, P, d]
                cache = route.peft.get_prompt(batch_size=batch)
            else:  # their embeddings go before the prompt's: [B, P + T, H]
                embeds = route.decoder.get_input_embeddings()(ids)
                prompt = route.peft.get_prompt(batch_size=batch).to(device=embeds.device, dtype=embeds.dtype)
                inputs = {"inputs_embeds": torch.cat([prompt, embeds], 1)}
        width = next(iter(inputs.values())).shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]  # padding sits at 0, masked anyway
        logits = _call(route, adapter_names, attention_mask=mask, position_ids=positions, cache=cache,
                       every_position=every_position, **inputs)
    if not every_position:
        return cache, mask, logits, None
    prompt = logits[:, -ids.shape[1]:]  # prompt tuning's virtual columns come first: not the prompt's
    return cache, mask, prompt[:, -1].float().cpu(), prompt


def _left_pad(tensor, width: int, dim: int):
    import torch.nn.functional as F

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pads = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pads)


class Group:
    """Rows that decode together: their route, cache, attention mask [B, L] and last tokens."""

    def __init__(self, route: Route):
        self.route = route
        self.rows: list = []
        self.cache = None
        self.mask = None

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list, cache, mask) -> None:
        """Let prefilled rows join: the narrower cache is left-padded (masked), then both are stacked."""
        from transformers import DynamicCache

        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        layers = [(_cat(a.keys, b.keys, width), _cat(a.values, b.values, width))
                  for a, b in zip(self.cache.layers, cache.layers)]  # each [B, heads, L, head_dim]
        self.cache = DynamicCache(layers)
        self.mask = _cat(self.mask, mask, width)
        self.rows += rows

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at `index`; columns that no remaining row attends to are dropped."""
        import torch

        if len(index) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in index]
        if not self.rows:
            self.cache = self.mask = None
            return
        select = torch.tensor(index, device=self.mask.device)
        self.cache.batch_select_indices(select)
        self.mask = self.mask[select]
        first = int(self.mask.any(0).int().argmax())  # the first column anyone still attends to
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]

    def step(self):
        """One decode step: each row's last token in, logits [B, V] (float32, CPU) out."""
        import torch

        last = torch.tensor([row.last for row in self.rows], device=self.mask.device)[:, None]  # [B, 1]
        positions = self.mask.sum(-1, keepdim=True)  # the columns each row has attended to so far
        self.mask = torch.cat([self.mask, torch.ones_like(last)], -1)
        names = [row.route.adapter_name for row in self.rows] if self.route.adapter_name is not None else None
        with self.route.decode_context():
            return _call(self.route, names, input_ids=last, attention_mask=self.mask, position_ids=positions,
                         cache=self.cache)


def _cat(a, b, width: int):
    """a and b left-padded to `width` along the sequence (dim -2 of keys/values, -1 of a mask), stacked."""
    import torch

    dim = -1 if a.dim() == 2 else -2
    return torch.cat([_left_pad(a, width, dim), _left_pad(b, width, dim)], 0)

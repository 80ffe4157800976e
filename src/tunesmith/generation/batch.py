"""The torch decoder (`tunesmith serve --backend torch`, and every offline caller): how a served model's rows run
(`Route`), a `Group` of rows that share forward passes over one KV cache, and `TorchDecoder`, which implements the
engine's `Decoder` (decoder.py) with them.

Every row is left-padded: its cache columns are [padding, (virtual tokens), prompt, generated], its attention
mask is 0 on padding, and its position ids count only the columns it attends to (the virtual tokens of prompt
and prefix tuning included, as peft's own forward numbers them). So rows of any lengths share one cache, and
rows join a group by left-padding the narrower of the two caches and concatenating along the batch: continuous
batching on transformers' DynamicCache, with no change to the model. A prompt goes in pieces (chunked prefill):
each piece is left-padded after the columns its row already has, so padding may also sit between a row's
columns, where the mask and the position ids skip it. Rows reading their prompt form one group per key, rows
decoding another, so a decode step never pays for a prompt piece's width.

A new row starts from the KV of the longest prefix of its prompt in the prefix cache (prefix_cache.py: copied
out of the entry, per served model and adapter), or empty, or with its adapter's virtual tokens.

Which rows may share a forward pass:
- a plain model: all its rows;
- LoRA adapters of one PeftModel and its base: all of them, in one pass with peft's `adapter_names` (one
  adapter name per row, "__base__" for the base) — mixed-adapter batches;
- prompt and prefix tuning: only the row's start needs the adapter (prompt tuning runs the virtual token
  embeddings through the model; prefix tuning starts the cache with peft's `get_prompt`, the virtual tokens'
  keys and values); every later forward is a plain forward of the underlying transformers model over that
  cache, so these rows run together with each other and with the base rows of the same PeftModel;
- any other adapter type (IA3, ...) runs with its adapter switched on, one adapter per group."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from ..data.tokenize import stop_token_ids
from ..errors import UsageError
from .prefix_cache import DEFAULT_MB, PrefixCache

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


def _empty(device):
    """The attention mask [1, 0] of a row with nothing in its cache yet."""
    import torch

    return torch.ones(1, 0, dtype=torch.long, device=device)


def virtual_start(route: Route, device):
    """(cache, mask [1, P]) of a prompt- or prefix-tuning row before its prompt: its adapter's P virtual tokens."""
    import torch
    from transformers import DynamicCache

    with route.prefill_context():
        virtual = route.peft.active_peft_config.num_virtual_tokens
        mask = torch.ones(1, virtual, dtype=torch.long, device=device)
        if route.virtual == "prefix":  # the virtual tokens' keys and values start the cache: [1, h, P, d]
            return route.peft.get_prompt(batch_size=1), mask
        like = route.decoder.get_input_embeddings().weight
        embeds = route.peft.get_prompt(batch_size=1).to(device=like.device, dtype=like.dtype)  # [1, P, H]
        cache = DynamicCache()
        _call(route, None, inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1),
              cache=cache)
    return cache, mask


def _left_pad(tensor, width: int, dim: int):
    import torch.nn.functional as F

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pads = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pads)


def _cat(a, b, width: int):
    """a and b left-padded to `width` along the sequence (dim -2 of keys/values, -1 of a mask), stacked."""
    import torch

    dim = -1 if a.dim() == 2 else -2
    return torch.cat([_left_pad(a, width, dim), _left_pad(b, width, dim)], 0)


def _layers(cache, like, batch: int) -> list:
    """(keys, values) per layer of `cache`, each [B, heads, L, head_dim]; of no columns (shaped as `like`'s)
    when it is None."""
    if cache is not None:
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(layer.keys.new_zeros(batch, layer.keys.shape[1], 0, layer.keys.shape[3]),
             layer.values.new_zeros(batch, layer.values.shape[1], 0, layer.values.shape[3])) for layer in like.layers]


class Group:
    """Rows that run together: their route, cache (None while empty), attention mask [B, L]."""

    def __init__(self, route: Route):
        self.route = route
        self.rows: list = []
        self.cache = None
        self.mask = None

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list, cache, mask) -> None:
        """Let rows join: the narrower cache is left-padded (masked), then both are stacked."""
        from transformers import DynamicCache

        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        if self.cache is not None or cache is not None:
            ours, theirs = _layers(self.cache, cache, len(self.rows)), _layers(cache, self.cache, len(rows))
            self.cache = DynamicCache([(_cat(a, c, width), _cat(b, d, width)) for (a, b), (c, d) in zip(ours, theirs)])
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
        self.mask = self.mask[select]
        if self.cache is not None:
            self.cache.batch_select_indices(select)
        self._trim()

    def take(self, index: list[int]) -> tuple[list, object, object]:
        """(rows, cache, mask) of the rows at `index`, taken out of this group (to join another)."""
        import torch
        from transformers import DynamicCache

        select = torch.tensor(index, device=self.mask.device)
        out = Group(self.route)
        out.rows, out.mask = [self.rows[i] for i in index], self.mask[select]
        if self.cache is not None:
            out.cache = DynamicCache([(layer.keys[select], layer.values[select]) for layer in self.cache.layers])
        out._trim()
        self.keep([i for i in range(len(self.rows)) if i not in set(index)])
        return out.rows, out.cache, out.mask

    def _trim(self) -> None:
        first = int(self.mask.any(0).int().argmax()) if self.mask.shape[1] else 0  # the first column in use
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]

    def feed(self, pieces: list[list[int]], pad_id: int, *, every_position: bool = False):
        """Run each row's next tokens (a decode step: its last token; a prefill: its prompt's next piece) over
        the cache. Logits [B, V] of the last column (float32, CPU), or with `every_position` [B, S, V] of the S
        columns fed, on the model's device."""
        import torch
        from transformers import DynamicCache

        from ..batching import device_of, pad

        device = self.mask.device if self.mask is not None else device_of(self.route.decoder)
        ids, new = pad(pieces, pad_id, side="left", device=device)  # [B, S] each
        mask = new if self.mask is None else torch.cat([self.mask, new], -1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # padding sits at 0, masked anyway
        cache = self.cache if self.cache is not None else DynamicCache()
        names = [row.slot.adapter_name for row in self.rows] if self.route.adapter_name is not None else None
        with self.route.decode_context():
            logits = _call(self.route, names, input_ids=ids, attention_mask=mask, position_ids=positions,
                           cache=cache, every_position=every_position)
        self.cache, self.mask = cache, mask
        return logits

    def kv_of(self, index: int) -> list:
        """(keys, values) per layer [1, heads, n, head_dim] of the columns the row at `index` attends to, copied."""
        cols = self.mask[index].nonzero()[:, 0]
        return [(layer.keys[index:index + 1, :, cols], layer.values[index:index + 1, :, cols])
                for layer in self.cache.layers]


class TorchDecoder:
    """The engine's decoder for transformers models and their peft adapters (see decoder.py). A row's `slot` is
    its Route; rows reading their prompt wait in one Group per route key, decoding rows in another."""

    name = "torch"

    def __init__(self, tokenizer, *, prefix_cache_mb: float = DEFAULT_MB):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id does
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20))  # payload: [(keys, values)] per layer
        self.owners: dict[int, weakref.ref] = {}  # Served.uid -> the Served, to drop the KV of unloaded models
        self.prefilling: dict[tuple, Group] = {}
        self.decoding: dict[tuple, Group] = {}

    def vocabulary(self, served) -> tuple[int, set[int]]:
        module = served.module
        head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        vocab = head.weight.shape[0] if head is not None else module.config.vocab_size  # the logits' width
        return vocab, stop_token_ids(self.tokenizer, getattr(module, "generation_config", None))

    def fits(self, served, prompt_tokens: int, max_tokens: int) -> bool:
        return True  # the cache grows as rows need it

    def start(self, row) -> None:
        from ..batching import device_of

        path = row.served.route()
        device = device_of(path.decoder)
        if path.virtual is not None:
            cache, mask = virtual_start(path, device)
        else:
            cache, mask = self._reused(row, device)
        row.slot, row.key = path, path.key
        group = self.prefilling.setdefault(path.key, Group(path))
        group.add([row], cache, mask)

    def _reused(self, row, device):
        """(cache, mask) of the longest cached prefix of the row's prompt (None, [1, 0] when there is none). At
        least the prompt's last token is left to compute: its logits pick the first token."""
        import torch
        from transformers import DynamicCache

        if row.scoring or not self.prefixes.budget:
            return None, _empty(device)
        dead = {uid for uid, owner in self.owners.items() if owner() is None}  # unloaded: their KV goes
        if dead:
            self.prefixes.drop_keys(dead.__contains__)
            self.owners = {uid: owner for uid, owner in self.owners.items() if uid not in dead}
        entry, n = self.prefixes.longest(row.served.uid, row.req.ids, len(row.req.ids) - 1)
        if not n:
            return None, _empty(device)
        row.fed = row.cached = n
        return (DynamicCache([(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in entry.payload]),
                torch.ones(1, n, dtype=torch.long, device=device))

    def prefill(self, rows: list, chunk: int) -> list:
        group = self.prefilling[rows[0].key]
        pieces = [row.req.ids[row.fed:row.fed + chunk] for row in group.rows]
        every = any(row.scoring for row in group.rows)
        logits = group.feed(pieces, self.pad_id, every_position=every)
        out = {}
        for i, (row, piece) in enumerate(zip(group.rows, pieces)):
            row.fed += len(piece)
            out[id(row)] = logits[i, -len(piece):] if row.scoring else \
                logits[i, -1].float().cpu() if every else logits[i]
        done = [i for i, row in enumerate(group.rows) if not row.prefilling]
        for i in done:  # the prompt is in: its KV may serve the next requests that begin with it
            self._remember(group, i)
        if done:  # these rows decode from now on
            joining = group.take(done)
            self.decoding.setdefault(group.route.key, Group(group.route)).add(*joining)
            if not group.rows:
                del self.prefilling[rows[0].key]
        return [out[id(row)] for row in rows]

    def step(self, rows: list):
        group = self.decoding[rows[0].key]
        logits = group.feed([[row.last] for row in group.rows], self.pad_id)
        for row in group.rows:
            row.fed += 1
        if group.rows == rows:
            return logits
        at = {id(row): i for i, row in enumerate(group.rows)}
        return logits[[at[id(row)] for row in rows]]

    def release(self, row, keep: bool) -> None:
        for groups in (self.prefilling, self.decoding):
            group = groups.get(row.key)
            if group is not None and any(r is row for r in group.rows):
                i = next(i for i, r in enumerate(group.rows) if r is row)
                if keep:
                    self._remember(group, i)
                group.keep([j for j in range(len(group.rows)) if j != i])
                if not group.rows:
                    del groups[row.key]
                return

    def _remember(self, group: Group, index: int) -> None:
        """Keep the KV of the row at `index` in the prefix cache, under its served model and adapter."""
        row = group.rows[index]
        ids = row.fed_ids()
        if not ids or not self.prefixes.budget or row.slot.virtual is not None or \
                self.prefixes.covers(row.served.uid, ids):
            return  # (a virtual-token row's KV depends on its adapter's virtual tokens, which its key ignores)
        kv = group.kv_of(index)
        size = sum(t.numel() * t.element_size() for pair in kv for t in pair)
        if self.prefixes.put(row.served.uid, ids, kv, size):
            self.owners.setdefault(row.served.uid, weakref.ref(row.served))

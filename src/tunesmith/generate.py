"""Text generation shared by the CLI, evaluation, chat and the server: sampling settings, stop sequences,
and streaming, on top of transformers' `generate`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .data.tokenize import encode_chat_prompt, stop_token_ids


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                    "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k or None, "max_new_tokens": self.max_new_tokens,
                "repetition_penalty": self.repetition_penalty}


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int


def _peft_cache_compat(model) -> None:
    """Let peft's prefix tuning see transformers' generation cache (idempotent, per model instance).

    From transformers 5.24 `generate` passes the KV cache to the model as `cache=` (`past_key_values=` is a
    deprecated alias). peft (0.21) still looks for `past_key_values` in the prepared inputs: finding none, it
    injects the prefix as `past_key_values` beside transformers' empty `cache`, and transformers keeps the
    empty cache, so the prefix is silently dropped. Renaming the key in the prepared inputs lets peft find
    the cache, inject the prefix at the first step and leave the filled cache alone afterwards; the model's
    forward maps `past_key_values` back to `cache`. Tested against the forward pass training uses."""
    inner = getattr(model, "base_model_prepare_inputs_for_generation", None)
    if inner is None or getattr(inner, "_tunesmith_compat", False):
        return

    def prepare(*args, **kwargs):
        inputs = inner(*args, **kwargs)
        if "cache" in inputs and "past_key_values" not in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    prepare._tunesmith_compat = True
    model.base_model_prepare_inputs_for_generation = prepare


def prompt_ids(tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
               chat_template: str | None = None) -> list[int]:
    """Token ids for a completion prompt or a chat conversation (with the generation prompt appended)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (completion) or messages (chat)")
    if messages is not None:
        return encode_chat_prompt(tokenizer, messages, chat_template=chat_template)
    return tokenizer(prompt, add_special_tokens=True, split_special_tokens=True)["input_ids"]


class _StopScanner:
    """Cuts streamed text at the first stop sequence, holding back a tail that might be the start of one,
    so no piece of a stop sequence ever reaches the caller."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.buffer += piece
        hits = [self.buffer.find(s) for s in self.stops if s in self.buffer]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[:min(hits)], ""
            return out
        cut = max(len(self.buffer) - self.hold, 0)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def stream(model, tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
           params: SamplingParams | None = None, chat_template: str | None = None,
           result: list | None = None) -> Iterator[str]:
    """Yield the reply as it is generated. If `result` is a list, the final `Generation` is appended to it."""
    import torch
    from transformers import TextIteratorStreamer

    params = params or SamplingParams()
    _peft_cache_compat(model)
    ids = prompt_ids(tokenizer, prompt=prompt, messages=messages, chat_template=chat_template)
    input_ids = torch.tensor([ids], device=model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    output: dict = {}

    def run():
        try:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            with torch.inference_mode():
                output["ids"] = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                    eos_token_id=sorted(stops) or None, pad_token_id=tokenizer.pad_token_id,
                    stop_strings=params.stop or None, tokenizer=tokenizer if params.stop else None,
                    **params.generate_kwargs())
        except BaseException as err:  # surface errors from the worker thread in the caller
            output["error"] = err
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    scanner, text = _StopScanner(params.stop), []
    for piece in streamer:
        if scanner.stopped:
            continue  # drain: generation ends within a token of the stop sequence
        out = scanner.feed(piece)
        if out:
            text.append(out)
            yield out
    worker.join()
    if "error" in output:
        raise output["error"]
    if not scanner.stopped and (tail := scanner.flush()):
        text.append(tail)
        yield tail
    new = output["ids"][0, len(ids):].tolist()
    hit_eos = bool(new) and new[-1] in stops
    finish = "stop" if scanner.stopped or hit_eos or len(new) < params.max_new_tokens else "length"
    if result is not None:
        result.append(Generation("".join(text), finish, len(ids), len(new)))


def generate(model, tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None,
             params: SamplingParams | None = None, chat_template: str | None = None,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Generate one reply; `on_text` receives each streamed piece as it arrives."""
    result: list[Generation] = []
    for piece in stream(model, tokenizer, prompt=prompt, messages=messages, params=params,
                        chat_template=chat_template, result=result):
        if on_text:
            on_text(piece)
    return result[0]


def generate_batch(model, tokenizer, requests: list[dict], *, params: SamplingParams | None = None,
                   chat_template: str | None = None, batch_size: int = 16, progress=None) -> list[Generation]:
    """Generate for many requests ({"prompt": ...} or {"messages": [...]}) in left-padded batches.

    Greedy unless the params sample; stop sequences cut each reply. Used by evaluation; `progress` (a
    progress.Progress) advances by each batch's size."""
    import torch

    from .batching import device_of, pad

    params = params or SamplingParams()
    _peft_cache_compat(model)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sorted(stops)[0]
    encoded = [prompt_ids(tokenizer, prompt=r.get("prompt"), messages=r.get("messages"),
                          chat_template=chat_template) for r in requests]
    results: list[Generation] = []
    if params.seed is not None:
        torch.manual_seed(params.seed)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        # Left padding: every prompt ends at the same position, so new tokens line up across the batch.
        input_ids, attention = pad(chunk, pad_id, side="left", device=device_of(model))
        width = input_ids.shape[1]
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, eos_token_id=sorted(stops) or None,
                                 pad_token_id=pad_id, **params.generate_kwargs())
        for ids, row in zip(chunk, out[:, width:].tolist()):
            results.append(_finish(tokenizer, row, stops, params, len(ids)))
        if progress is not None:
            progress.update(len(chunk))
    return results


def _finish(tokenizer, new: list[int], stops: set[int], params: SamplingParams, n_prompt: int) -> Generation:
    """Trim one generated row at its first stop token or stop sequence and say why it ended."""
    end = next((i for i, t in enumerate(new) if t in stops), None)
    tokens = new if end is None else new[:end]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    hits = [text.find(s) for s in params.stop if s and s in text]
    if hits:
        text = text[:min(hits)]
    finish = "stop" if end is not None or hits else "length"
    return Generation(text, finish, n_prompt, len(tokens) + (end is not None))

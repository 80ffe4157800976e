"""The one generation engine behind every caller: `tunesmith generate`, `tunesmith chat`, evaluation and the
server all decode through `Engine` with the same `SamplingParams`, so the same model, prompt, seed and settings
give the same text everywhere.

- params.py   SamplingParams (the settings) and the TokenMask hook for constrained decoding
- sampler.py  one row's token choice: penalties, logit_bias, mask, greedy or seeded sampling, logprobs
- text.py     one row's text: incremental detokenization and stop strings cut exactly
- engine.py   Engine, the one scheduler: the waiting list, admission, rows, chunked prefill, events; Served,
              Request, Event
- decoder.py  Decoder: what the engine asks of a backend (place rows, feed them tokens, give their places back)
- batch.py    the torch decoder: routes (plain, LoRA mixed batches, prompt/prefix tuning), KV-cache groups
- llamacpp.py the llama.cpp decoder: GGUF files, sequences of one unified KV cache
- prefix_cache.py  the KV of prompts seen before, reused by requests that begin with the same tokens
- device.py   `--device`: where the model runs
- api.py      the Python API over it: `generate`, `stream` and `generate_batch`, run in the caller's thread"""

from .engine import Engine, Event, QueueFull, Request, Row, Served
from .params import GREEDY_BELOW, SamplingParams, TokenMask
from .sampler import Sampler, Token
from .text import Detokenizer, StopScanner
from .api import Generation, GenerationError, generate, generate_batch, prompt_ids, stream

__all__ = ["Engine", "Event", "QueueFull", "Request", "Row", "Served", "GREEDY_BELOW", "SamplingParams",
           "TokenMask", "Sampler", "Token", "Detokenizer", "StopScanner", "Generation", "GenerationError", "generate",
           "generate_batch", "prompt_ids", "stream"]

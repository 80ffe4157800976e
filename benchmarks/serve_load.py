"""Load test for `tunesmith serve`: N concurrent streaming chat clients against one server, with batching on
(--max-batch 16) and off (--max-batch 1). Reports aggregate generated tokens/s and median/p90 time to first
token. Run: .venv/bin/python benchmarks/serve_load.py [--model NAME] [--requests 2] [--max-tokens 64] [--threads 1]

The server batches continuously (tunesmith.generation): a request that arrives while others decode is
prefilled at the next step and joins them, and a finished row's place is taken at once.

Recorded before continuous batching (2026-11-23, the old engine, whose batches ran to completion; `--threads
1`, on a 2-core x86_64 CPU machine that was also running two other jobs, load average 5.5; 2 streamed greedy
chat requests per client, max_tokens 32, smollm2-135m-instruct):

    batching   clients  tokens/s  TTFT p50  TTFT p90  wall s
    on (16)          1       6.2     0.36s     0.38s     3.2
    on (16)          4       9.9     2.16s     6.32s    15.3
    on (16)         16      26.6     6.68s     8.67s    28.8
    off (1)          1       8.7     0.29s     0.31s     2.3
    off (1)          4       8.7     5.57s     7.63s    17.4
    off (1)         16       9.5    36.72s    41.26s    80.4

The old batches ran to completion before the next one started, so a request that arrived while a batch
decoded waited for it: that is the TTFT at 4 and 16 clients. With continuous batching, on the same 2-core CPU
machine (2026-11-26, nothing else running, `--clients 1,16 --requests 2 --max-tokens 64`, every reply 64
tokens, smollm2-135m-instruct):

    batching   clients  tokens/s  TTFT p50  TTFT p90  wall s
    on (16)          1      20.8     0.13s     0.14s     6.1
    on (16)         16     135.6     0.81s     0.96s    15.1
    off (1)          1      21.4     0.13s     0.13s     6.0
    off (1)         16      25.1    36.84s    38.33s    81.6

16 clients get 6.5x one client's tokens/s, and a p90 time to first token under a second. On one NVIDIA H200 (2026-11-26, continuous batching, a random Llama shaped like SmolLM2-135M,
bfloat16, `--clients 1,16 --requests 2 --max-tokens 64`):

    batching   clients  tokens/s  TTFT p50  TTFT p90  wall s
    on (16)          1      27.4     0.05s     0.07s     4.7
    on (16)         16     241.1     0.42s     0.61s     8.5
    off (1)          1      27.3     0.05s     0.07s     4.7
    off (1)         16      51.7    17.85s    18.35s    39.6"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import httpx
from served import served

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2+2?", "Say hello in Spanish.",
             "What is a cat?", "Why is the sky blue?", "Count to five.", "What is Python?"]


@dataclass
class Streamed:
    """One streamed chat reply, its times counted from the moment the request was sent."""

    ttft: float  # seconds to the first piece of content
    last: float  # seconds to the last piece of content
    tokens: int  # usage.completion_tokens
    prompt_tokens: int
    cached_tokens: int  # usage.prompt_tokens_details.cached_tokens (0 where the server does not say)
    text: str

    @property
    def decode_rate(self) -> float:
        """Tokens per second once the reply streams: the first token's time is the prompt's, not decoding's."""
        return (self.tokens - 1) / max(self.last - self.ttft, 1e-9)


async def stream(client: httpx.AsyncClient, body: dict) -> Streamed:
    """POST `body` to /v1/chat/completions streamed (greedy unless it says otherwise, usage asked for), timed."""
    body = {"temperature": 0, **body, "stream": True, "stream_options": {"include_usage": True}}
    started, first, last, usage, text = time.perf_counter(), None, None, {}, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{response.status_code} from {client.base_url}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and (piece := chunk["choices"][0]["delta"].get("content")):
                last = time.perf_counter() - started
                first = first if first is not None else last
                text.append(piece)
            usage = chunk.get("usage") or usage
    end = time.perf_counter() - started
    return Streamed(first if first is not None else end, last if last is not None else end,
                    usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0),
                    (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0), "".join(text))


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int, ban: dict[str, float],
               messages=None) -> dict:
    """`clients` streaming clients at once, each sending `requests` chat requests one after another: aggregate
    completion tokens/s, time to first token (median, p90) and the mean prompt and cached tokens of a request.
    `messages(client, request)` gives each request's messages (default: one of QUESTIONS)."""
    messages = messages or (lambda c, r: [{"role": "user", "content": QUESTIONS[(c + r) % len(QUESTIONS)]}])
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def worker(c: int) -> list[Streamed]:
            return [await stream(client, {"model": model, "messages": messages(c, r), "max_tokens": max_tokens,
                                          "logit_bias": ban}) for r in range(requests)]

        started = time.perf_counter()
        results = [x for per in await asyncio.gather(*(worker(c) for c in range(clients))) for x in per]
        wall = time.perf_counter() - started
    ttfts = [r.ttft for r in results]
    return {"tokens_per_s": sum(r.tokens for r in results) / wall, "ttft_median": statistics.median(ttfts),
            "ttft_p90": p90(ttfts), "wall": wall, "prompt_tokens": statistics.mean(r.prompt_tokens for r in results),
            "cached_tokens": statistics.mean(r.cached_tokens for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--threads", type=int, help="torch threads in the server (default: torch's); 1 avoids "
                        "OpenMP oversubscription on a machine that is busy with other work")
    parser.add_argument("--natural-length", action="store_true", help="let replies stop at their end-of-turn "
                        "token (default: the stop tokens are banned, so every reply has exactly --max-tokens)")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    import torch

    from tunesmith.data.tokenize import stop_token_ids
    from tunesmith.models import load_generation_config, load_tokenizer

    stops = stop_token_ids(load_tokenizer(args.model), load_generation_config(args.model))
    ban = {} if args.natural_length else {str(t): -100 for t in sorted(stops)}
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({args.threads or torch.get_num_threads()} threads), load average "
          f"{os.getloadavg()[0]:.1f}; model {args.model}; "
          f"{args.requests} streamed chat requests per client, max_tokens {args.max_tokens}"
          f"{' (natural length)' if args.natural_length else ' (every reply that long)'}, greedy")
    print(f"{'batching':10} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'wall s':>7}")
    for label, max_batch in (("on (16)", 16), ("off (1)", 1)):
        with served(args.model, "--max-batch", str(max_batch), threads=args.threads) as url:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            asyncio.run(load(url, model, 1, 1, 4, ban))  # warm-up
            for clients in counts:
                r = asyncio.run(load(url, model, clients, args.requests, args.max_tokens, ban))
                print(f"{label:10} {clients:7d} {r['tokens_per_s']:9.1f} {r['ttft_median']:8.2f}s "
                      f"{r['ttft_p90']:8.2f}s {r['wall']:7.1f}", flush=True)


if __name__ == "__main__":
    main()

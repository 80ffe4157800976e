"""`tunesmith serve --backend llama-cpp` against `tunesmith serve` (torch) on the same model, side by side in one
run: batch-1 decode speed through the HTTP API (the openai client, streaming), the same llama.cpp called
directly (llama-cpp-python's `Llama`, and tunesmith's llama-cpp engine without the server), then 16 concurrent
streaming clients (aggregate tokens/s, time to first token).

    .venv/bin/python benchmarks/serve_backends.py [--model smollm2-135m-instruct | RUN] [--gguf-quant q8_0]
                                                  [--max-tokens 128] [--rounds 5] [--clients 16] [--requests 2]

This machine's speed drifts by a third within an hour (other tenants of the host), so the paths are measured in
rounds: both servers are up from the start, and each round times one reply of every path back to back (only one
of them computing at a time). The ratios are taken within each round; the table shows each path's median and
best, and the median of the per-round ratios. --model may be a run directory: torch serves the run, llama.cpp
its export at --gguf-quant.

Batch 1: one streamed chat reply of exactly --max-tokens tokens (the stop tokens banned with logit_bias), greedy;
"decode tokens/s" is (tokens - 1) / (time of the last token - time of the first), the speed once the reply
streams. The embedded model is served from its Q4_1 GGUF by llama.cpp and as the dequantised float32 model by
torch.
Results: benchmarks/serve_backends.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from served import served  # noqa: E402
from serve_load import load  # noqa: E402

QUESTION = [{"role": "user", "content": "Tell me a long story about a cat who learns to sail."}]


def timed(stream) -> tuple[float, float, int]:
    """(seconds to the first token, seconds from the first token to the last, tokens) of a stream of pieces."""
    started, first, last, tokens = time.perf_counter(), None, None, 0
    for piece in stream:
        if piece:
            last = time.perf_counter()
            first = first or last
            tokens += 1
    return first - started, last - first, tokens


def decode_rate(run: tuple[float, float, int]) -> float:
    _, span, n = run
    return (n - 1) / span


def over_http(url: str, model: str, max_tokens: int, ban: dict):
    """One batch-1 streamed chat through the openai client, timed; one piece per token."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def pieces():
        for chunk in client.chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens,
                                                    temperature=0, logit_bias=ban, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:  # the role chunk's content is ""
                yield chunk.choices[0].delta.content
    return lambda: timed(pieces())


def llama_cpp_direct(gguf: Path, ids: list[int], max_tokens: int, ban: dict):
    """llama-cpp-python's own `Llama` on the same GGUF and prompt ids: greedy, streamed, no server."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=len(os.sched_getaffinity(0)), verbose=False)

    def pieces():
        for out in llm.create_completion(ids, max_tokens=max_tokens, temperature=0, stream=True,
                                         logit_bias={int(k): v for k, v in ban.items()}):
            yield out["choices"][0]["text"] or " "
    return lambda: timed(pieces())


def engine_direct(model: str, ids: list[int], max_tokens: int, ban: dict, quant: str):
    """tunesmith's llama-cpp engine driven by step() in this thread: the server's decoder without HTTP."""
    from tunesmith.generation import Request
    from tunesmith.serve.backends import load_gguf_engine

    engine = load_gguf_engine(model, max_batch=16, gguf_quant=quant)
    engine.threaded = False

    def pieces():
        events = []
        engine.submit([Request(model, ids, max_tokens, events.append, temperature=0,
                               logit_bias={int(k): v for k, v in ban.items()})])
        while engine.busy:
            engine.step()
            while events:
                event = events.pop(0)
                if event.finish_reason is None:
                    yield event.text or " "
    return lambda: timed(pieces())


TORCH = "tunesmith serve --backend torch (HTTP, openai client)"
LLAMA = "tunesmith serve --backend llama-cpp (HTTP, openai client)"
LLAMA_DIRECT, ENGINE_DIRECT = "llama-cpp-python Llama, called directly", "tunesmith llama-cpp engine, called directly"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model or a run directory")
    parser.add_argument("--gguf-quant", default="q8_0", help="the type a run is exported at for llama.cpp")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the concurrent test")
    parser.add_argument("--concurrent-max-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    from tunesmith.data.tokenize import encode_chat_prompt, stop_token_ids
    from tunesmith.models import EMBEDDED, embedded_gguf, load_generation_config, load_tokenizer
    from tunesmith.serve.backends import gguf_of

    torch.set_num_threads(1)  # this process only times and drives; its idle OpenMP threads would spin
    tokenizer = load_tokenizer(args.model)
    ban = {str(t): -100.0 for t in sorted(stop_token_ids(tokenizer, load_generation_config(args.model)))}
    ids = encode_chat_prompt(tokenizer, QUESTION)
    run = args.model not in EMBEDDED
    gguf = gguf_of(args.model, args.gguf_quant)[0] if run else embedded_gguf(args.model)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}; llama-cpp-python {__import__('llama_cpp').__version__}; model {args.model}"
          f" (llama.cpp: {gguf.name}{f', {args.gguf_quant}' if run else ''}); prompt {len(ids)} tokens")

    paths, servers = {}, {}
    with contextlib.ExitStack() as stack:
        for backend, name in (("torch", TORCH), ("llama-cpp", LLAMA)):
            extra = ("--gguf-quant", args.gguf_quant) if run and backend == "llama-cpp" else ()
            url = stack.enter_context(served(args.model, "--backend", backend, "--max-batch", str(args.clients),
                                             *extra))
            servers[backend] = url
            paths[name] = over_http(url, args.model, args.max_tokens, ban)
        paths[LLAMA_DIRECT] = llama_cpp_direct(gguf, ids, args.max_tokens, ban)
        paths[ENGINE_DIRECT] = engine_direct(args.model, ids, args.max_tokens, ban, args.gguf_quant)
        for path in paths.values():  # warm-up
            path()
        rounds = []
        for i in range(args.rounds):
            rounds.append({name: decode_rate(path()) for name, path in paths.items()})
            print(f"round {i + 1}: " + ", ".join(f"{r:.1f}" for r in rounds[-1].values()) + " tok/s", flush=True)
        concurrent = {}
        for backend, url in servers.items():
            asyncio.run(load(url, args.model, 1, 1, 4, ban))  # warm-up
            concurrent[backend] = asyncio.run(load(url, args.model, args.clients, args.requests,
                                                   args.concurrent_max_tokens, ban))

    def ratio(a: str, b: str) -> float:
        return statistics.median(r[a] / r[b] for r in rounds)

    print(f"\nbatch 1: one streamed greedy reply of {args.max_tokens} tokens per path per round, {args.rounds} rounds")
    print(f"{'path':58} {'median tok/s':>12} {'best':>6} {'vs torch (median of rounds)':>28}")
    for name in paths:
        rates = [r[name] for r in rounds]
        print(f"{name:58} {statistics.median(rates):12.1f} {max(rates):6.1f} {ratio(name, TORCH):27.2f}x")
    for name in (LLAMA_DIRECT, ENGINE_DIRECT):
        print(f"llama-cpp server / {name}: {ratio(LLAMA, name):.2f}x (median of rounds)")
    print(f"\n{args.clients} concurrent clients, {args.requests} streamed chat requests each, "
          f"max_tokens {args.concurrent_max_tokens} (every reply that long), --max-batch {args.clients}")
    print(f"{'backend':10} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'wall s':>7}")
    for backend, r in concurrent.items():
        print(f"{backend:10} {r['tokens_per_s']:9.1f} {r['ttft_median']:8.2f}s {r['ttft_p90']:8.2f}s {r['wall']:7.1f}")


if __name__ == "__main__":
    main()

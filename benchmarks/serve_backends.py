"""`tunesmith serve --backend llama-cpp` against `tunesmith serve` (torch) on the same model, side by side in one
run: batch-1 decode speed through the HTTP API (the openai client, streaming), the same llama.cpp called
directly (llama-cpp-python's `Llama`, and tunesmith's llama-cpp engine without the server), then 16 concurrent
streaming clients (aggregate tokens/s, time to first token). The servers run one at a time.

    .venv/bin/python benchmarks/serve_backends.py [--model smollm2-135m-instruct] [--max-tokens 128]
                                                  [--repeats 3] [--clients 16] [--requests 2]

Batch 1: one streamed chat reply of exactly --max-tokens tokens (the stop tokens banned with logit_bias), greedy;
"decode tokens/s" is (tokens - 1) / (time of the last token - time of the first), the speed once the reply
streams; "with prefill" divides all tokens by the whole call. Best of --repeats after a warm-up. The
embedded model is served from its Q4_1 GGUF by llama.cpp and as the dequantised float32 model by torch.
Results: benchmarks/serve_backends.md."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from served import start_server  # noqa: E402
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


def rates(runs: list[tuple[float, float, int]]) -> dict:
    decode = [(n - 1) / span for _, span, n in runs]
    whole = [n / (ttft + span) for ttft, span, n in runs]
    return {"decode": max(decode), "whole": max(whole), "tokens": runs[0][2], "median": statistics.median(decode)}


def over_http(url: str, model: str, max_tokens: int, ban: dict, repeats: int) -> dict:
    """Batch-1 streamed chat through the openai client; one piece per token (usage checked)."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def pieces():
        for chunk in client.chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens,
                                                    temperature=0, logit_bias=ban, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:  # the role chunk's content is ""
                yield chunk.choices[0].delta.content
    timed(pieces())  # warm-up
    return rates([timed(pieces()) for _ in range(repeats)])


def llama_cpp_direct(gguf: Path, ids: list[int], max_tokens: int, ban: dict, repeats: int) -> dict:
    """llama-cpp-python's own `Llama` on the same GGUF and prompt ids: greedy, streamed, no server."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=len(os.sched_getaffinity(0)), verbose=False)

    def pieces():
        for out in llm.create_completion(ids, max_tokens=max_tokens, temperature=0, stream=True,
                                         logit_bias={int(k): v for k, v in ban.items()}):
            yield out["choices"][0]["text"] or " "
    timed(pieces())
    return rates([timed(pieces()) for _ in range(repeats)])


def engine_direct(model: str, ids: list[int], max_tokens: int, ban: dict, repeats: int) -> dict:
    """tunesmith's llama-cpp engine driven by step() in this thread: the server's decoder without HTTP."""
    from tunesmith.generation import Request
    from tunesmith.serve.backends import load_gguf_engine

    engine = load_gguf_engine(model, max_batch=16)
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
    timed(pieces())
    return rates([timed(pieces()) for _ in range(repeats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the concurrent test")
    parser.add_argument("--concurrent-max-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    from tunesmith.data.tokenize import encode_chat_prompt, stop_token_ids
    from tunesmith.models import embedded_gguf, load_generation_config, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    ban = {str(t): -100.0 for t in sorted(stop_token_ids(tokenizer, load_generation_config(args.model)))}
    ids = encode_chat_prompt(tokenizer, QUESTION)
    gguf = embedded_gguf(args.model)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"llama-cpp-python {__import__('llama_cpp').__version__}; model {args.model}; prompt {len(ids)} tokens")

    batch1, concurrent = {}, {}
    for backend in ("torch", "llama-cpp"):
        proc, url = start_server(args.model, "--backend", backend, "--max-batch", str(args.clients))
        try:
            batch1[f"tunesmith serve --backend {backend} (HTTP, openai client)"] = \
                over_http(url, args.model, args.max_tokens, ban, args.repeats)
            asyncio.run(load(url, args.model, 1, 1, 4, ban))  # warm-up
            concurrent[backend] = asyncio.run(load(url, args.model, args.clients, args.requests,
                                                   args.concurrent_max_tokens, ban))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if gguf is not None:
        batch1["llama-cpp-python Llama, called directly"] = llama_cpp_direct(gguf, ids, args.max_tokens, ban,
                                                                              args.repeats)
    batch1["tunesmith llama-cpp engine, called directly"] = engine_direct(args.model, ids, args.max_tokens, ban,
                                                                          args.repeats)

    torch_rate = batch1["tunesmith serve --backend torch (HTTP, openai client)"]["decode"]
    print(f"\nbatch 1: one streamed greedy reply of {args.max_tokens} tokens, best of {args.repeats}")
    print(f"{'path':58} {'decode tok/s':>12} {'median':>7} {'with prefill':>12} {'vs torch':>8}")
    for name, r in batch1.items():
        print(f"{name:58} {r['decode']:12.1f} {r['median']:7.1f} {r['whole']:12.1f} {r['decode'] / torch_rate:7.2f}x")
    for name in list(batch1)[2:]:
        served = batch1["tunesmith serve --backend llama-cpp (HTTP, openai client)"]["decode"]
        print(f"llama-cpp server / {name}: {served / batch1[name]['decode']:.2f}x")
    print(f"\n{args.clients} concurrent clients, {args.requests} streamed chat requests each, "
          f"max_tokens {args.concurrent_max_tokens} (every reply that long), --max-batch {args.clients}")
    print(f"{'backend':10} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'wall s':>7}")
    for backend, r in concurrent.items():
        print(f"{backend:10} {r['tokens_per_s']:9.1f} {r['ttft_median']:8.2f}s {r['ttft_p90']:8.2f}s {r['wall']:7.1f}")


if __name__ == "__main__":
    main()

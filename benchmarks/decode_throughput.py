"""Single-stream decode speed: tunesmith's engine (the Python API and `tunesmith serve`, one streamed request)
against transformers' `generate` at batch 1, on the same model, prompt and greedy settings, in the same run.

    .venv/bin/python benchmarks/decode_throughput.py [--model NAME] [--max-new-tokens 64] [--repeats 3]
                                                     [--threads N] [--device auto|cpu|cuda] [--no-server]

Every figure is generated tokens / wall seconds of the whole call (prefill included), after one warm-up each.
The paths run in `--repeats` interleaved rounds (generate, engine, server, then again); the table shows each
path's best speed and the median over the rounds of its speed divided by `generate`'s in the same round. The engine and `generate` are made to produce exactly `--max-new-tokens` tokens (the
stop tokens banned); the server does too where its request schema accepts `logit_bias`, otherwise the reply
may stop early and the row shows how many tokens it had.

Recorded (2026-11-26, one NVIDIA H200, torch 2.11.0+cu130, transformers 5.24.0, bfloat16; a random Llama shaped
like SmolLM2-135M with the tests' 400-token BPE, as the device machine has no copy of the real model;
`--model DIR --device cuda --max-new-tokens 128`):

    path                                tokens/s  tokens  vs generate
    transformers generate, batch 1          55.4     128        1.00x
    tunesmith engine (generate())           60.1     128        1.08x
    tunesmith serve, 1 stream               62.8     128        1.13x

On the project's 2-core x86_64 CPU machine (2026-11-26, torch 2.13.0+cpu with 2 threads, smollm2-135m-instruct in
float32, `--repeats 7`):

    path                               best tokens/s  tokens  vs generate (median of rounds)
    transformers generate, batch 1              20.2      64                           1.00x
    tunesmith engine (generate())               21.0      64                           1.03x
    tunesmith serve, 1 stream                   21.3      64                           0.95x

Earlier runs that day (non-interleaved, best of 3 or 5) gave the server 0.92x and 0.98x: the server process, its
event loop and this client share the two cores, so its figure moves by several percent."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time

from served import served

PROMPT = "Write a long story about a cat who learns to sail across the ocean."


def _rounds(paths: list[tuple[str, object]], repeats: int) -> list[tuple[str, float, float, int]]:
    """Per path (label, best tokens/s, median of its per-round ratio to the first path, tokens). Each round runs
    every path once, one after another, so a neighbour's load drifting over the minutes hits them alike; the
    first call of each path is a warm-up (first-call allocations and lazy imports are not decode speed)."""
    import statistics

    for _, fn in paths:
        fn()
    speeds: list[list[float]] = [[] for _ in paths]
    tokens = [0] * len(paths)
    for _ in range(repeats):
        for i, (_, fn) in enumerate(paths):
            started = time.perf_counter()
            tokens[i] = fn()
            speeds[i].append(tokens[i] / (time.perf_counter() - started))
    return [(label, max(speeds[i]), statistics.median(s / a for s, a in zip(speeds[i], speeds[0])), tokens[i])
            for i, (label, _) in enumerate(paths)]


def _server_call(url: str, model: str, max_tokens: int, stops: set[int]):
    import httpx

    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": {str(t): -100 for t in stops}}
    probe = {k: v for k, v in body.items() if k != "stream_options"}
    probe = httpx.post(url + "/v1/completions", json={**probe, "stream": False, "max_tokens": 1}, timeout=600)
    if probe.status_code == 400 and probe.json()["error"]["param"] == "logit_bias":
        del body["logit_bias"]  # this server cannot ban the stop tokens: the reply may end early

    def call() -> int:
        tokens = 0
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                    tokens = usage["completion_tokens"]
        return tokens
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-server", action="store_true", help="skip the `tunesmith serve` row")
    args = parser.parse_args()

    import torch
    import transformers

    from tunesmith.data.tokenize import stop_token_ids
    from tunesmith.generation import SamplingParams, generate, prompt_ids
    from tunesmith.generation.device import place
    from tunesmith.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    model = place(model, args.device)
    n = args.max_new_tokens
    stops = stop_token_ids(tokenizer, model.generation_config)
    ids = torch.tensor([prompt_ids(tokenizer, prompt=PROMPT)], device=model.device)

    def hf() -> int:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=tokenizer.pad_token_id)
        return out.shape[1] - ids.shape[1]

    params = SamplingParams(max_new_tokens=n, logit_bias={t: -100.0 for t in stops})

    def engine() -> int:
        return generate(model, tokenizer, prompt=PROMPT, params=params).completion_tokens

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"model {args.model} on {model.device} ({next(model.parameters()).dtype}); {n} new tokens, greedy, "
          f"best of {args.repeats}")
    paths = [("transformers generate, batch 1", hf), ("tunesmith engine (generate())", engine)]
    with contextlib.ExitStack() as servers:
        if not args.no_server:
            url = servers.enter_context(served(args.model, "--device", args.device, threads=args.threads))
            name = json.loads(__import__("httpx").get(url + "/v1/models").text)["data"][0]["id"]
            paths.append(("tunesmith serve, 1 stream", _server_call(url, name, n, stops)))
        rows = _rounds(paths, args.repeats)
    print(f"{'path':34} {'best tokens/s':>14} {'tokens':>7} {'vs generate (median of rounds)':>31}")
    for label, speed, ratio, tokens in rows:
        print(f"{label:34} {speed:14.1f} {tokens:7d} {ratio:30.2f}x")

if __name__ == "__main__":
    main()

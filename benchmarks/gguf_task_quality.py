"""What a GGUF quant type costs on the task a run was trained for: the run's held-out predictions (its
predictions.jsonl, decoded by torch when it was trained) against the same prompts decoded greedily by llama.cpp
from the run's export at each type, the export `tunesmith serve --backend llama-cpp --gguf-quant TYPE` serves.
Reports exact match against the gold answers and the share of replies identical to torch's.

    .venv/bin/python benchmarks/gguf_task_quality.py RUN [--quants f16 q8_0 q4_1 q4_0] [--max-tokens 32]

Exports go to the tunesmith cache, as the server's do (the first use of a type exports it)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def decode_all(engine, model: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy replies of the llama-cpp engine to every prompt, batched as the server batches them."""
    from tunesmith.generation import Request

    texts = [[] for _ in prompts]
    engine.threaded = False
    engine.submit([Request(model, ids, max_tokens, lambda e, i=i: texts[i].append(e.text or ""), temperature=0)
                   for i, ids in enumerate(prompts)])
    while engine.busy:
        engine.step()
    return ["".join(t) for t in texts]


def main(argv: list[str] | None = None) -> int:
    from tunesmith.data.tokenize import encode_chat_prompt
    from tunesmith.metrics import exact_match
    from tunesmith.serve.backends import load_gguf_engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_1", "q4_0"])
    parser.add_argument("--max-tokens", type=int, default=32, help="the run's eval_max_new_tokens")
    args = parser.parse_args(argv)

    rows = [json.loads(line) for line in Path(args.run, "predictions.jsonl").read_text().splitlines() if line]
    gold = [r["gold"] for r in rows]
    torch_said = [r["prediction"] for r in rows]
    em = sum(exact_match(p, g) for p, g in zip(torch_said, gold)) / len(rows)
    print(f"{args.run}: {len(rows)} held-out examples; torch (predictions.jsonl): exact match {em:.4f}")
    print("| served as | exact match | replies identical to torch's | seconds |")
    print("|---|---|---|---|")
    print(f"| torch, float32 (the run) | {em:.4f} | 1.0000 | |")
    for quant in args.quants:
        engine = load_gguf_engine(args.run, max_batch=16, max_queue=len(rows), gguf_quant=quant)
        prompts = [encode_chat_prompt(engine.tokenizer, r["input"]["messages"]) for r in rows]
        started = time.perf_counter()
        said = decode_all(engine, args.run, prompts, args.max_tokens)
        seconds = time.perf_counter() - started
        em = sum(exact_match(p, g) for p, g in zip(said, gold)) / len(rows)
        same = sum(a.strip() == b.strip() for a, b in zip(said, torch_said)) / len(rows)
        print(f"| llama.cpp, {quant} | {em:.4f} | {same:.4f} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tool calling on a live `tunesmith serve` (the embedded model unless --model): how many forced calls parse
and validate, and what tool definitions cost in time to first token.

1. `--samples` requests (seeds 0..N-1) at `tool_choice: required`, temperature 1, with four bike-shop tools,
   with `parallel_tool_calls` false (one call) and true (OpenAI's default: one call or more): the count whose
   reply is `tool_calls` that parse and whose arguments validate against the function's schema (jsonschema),
   with the finish reasons, calls per reply and completion tokens.
2. Time to first token of one streamed chat request with the four definitions in the prompt (tool_choice
   "none", so the first token streams as content) against the same request without tools, in `--rounds`
   alternating rounds; the prompt tokens each has.

    .venv/bin/python benchmarks/tool_calls.py [--backend torch|llama-cpp] [--samples 100] [--rounds 7]
        [--model RUN --data examples/data/support-tools/test.jsonl]

With `--data`, the forced calls are asked of a tools file's own conversations instead (those whose last turn is a
call: the messages before it, with the record's tools), cycled to `--samples`: a trained run on its task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from served import served  # noqa: E402

ORDER = {"type": "string", "pattern": "^[0-9]{5}$", "description": "The five-digit order number"}
TOOLS = [{"type": "function", "function": {"name": name, "description": description, "parameters": {
    "type": "object", "properties": properties, "required": list(properties)}}} for name, description, properties in [
    ("lookup_order", "Look up the status of an order", {"order_id": ORDER}),
    ("create_refund", "Refund an order, in full or in part", {
        "order_id": ORDER, "amount": {"type": "number", "minimum": 0, "description": "The amount in euros"},
        "reason": {"type": "string", "enum": ["damaged", "late", "wrong_item", "other"]}}),
    ("change_address", "Change the delivery address of an order", {
        "order_id": ORDER, "street": {"type": "string"}, "city": {"type": "string"},
        "postcode": {"type": "string"}}),
    ("store_hours", "Opening hours of a shop on a given day", {
        "day": {"type": "string", "enum": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
                                           "sunday"]}})]]
MESSAGES = [{"role": "system", "content": "You are the support assistant of a bike shop."},
            {"role": "user", "content": "My order 48213 arrived with a bent wheel. Can I get my money back?"}]


def prompts_of(path: Path | None) -> list[tuple[list[dict], list[dict]]]:
    """(messages, tools) to force calls on: the fixed bike-shop request, or each record of a tools file that ends
    in a call, without that call."""
    if path is None:
        return [(MESSAGES, TOOLS)]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["messages"][:-1], r["tools"]) for r in records if r["messages"][-1].get("tool_calls")]


def forced_calls(client, model: str, samples: int, max_tokens: int, parallel: bool, prompts) -> dict:
    import jsonschema

    def one(seed: int):
        messages, tools = prompts[seed % len(prompts)]
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        reply = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                               temperature=1.0, seed=seed, max_tokens=max_tokens,
                                               parallel_tool_calls=parallel)
        choice, good = reply.choices[0], 0
        for call in choice.message.tool_calls or []:
            try:
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
                good += 1
            except (ValueError, KeyError, jsonschema.ValidationError):
                pass
        ok = bool(choice.message.tool_calls) and good == len(choice.message.tool_calls)
        return ok, choice.finish_reason, reply.usage.completion_tokens, len(choice.message.tool_calls or [])

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(samples)))
    return {"parallel_tool_calls": parallel, "samples": samples, "parse_and_validate": sum(r[0] for r in results),
            "finish_reasons": dict(Counter(r[1] for r in results)),
            "calls_per_reply": dict(Counter(r[3] for r in results)),
            "completion_tokens_mean": statistics.mean(r[2] for r in results),
            "wall_s": round(time.perf_counter() - start, 1)}


def first_token(client, model: str, tools) -> tuple[float, int]:
    """(seconds to the first content token, prompt tokens) of one streamed greedy request."""
    extra = {"tools": tools, "tool_choice": "none"} if tools else {}
    start, ttft, prompt = time.perf_counter(), None, None
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}, **extra):
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage:
            prompt = chunk.usage.prompt_tokens
    return ttft, prompt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--backend", default="torch", choices=["torch", "llama-cpp"])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--data", type=Path, help="a tools file whose conversations the forced calls continue")
    args = parser.parse_args(argv)
    prompts = prompts_of(args.data)
    from openai import OpenAI

    with served(args.model, "--backend", args.backend, "--max-batch", "8") as url:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        first_token(client, model, TOOLS)  # warm up
        times = {"none": [], "4 tools": []}
        for _ in range(args.rounds):
            for label, tools in (("none", None), ("4 tools", TOOLS)):
                ttft, prompt = first_token(client, model, tools)
                times[label].append((ttft, prompt))
        if args.rounds:
            print(f"time to first token ({args.backend}, median of {args.rounds} rounds):")
        for label, runs in times.items() if args.rounds else ():
            print(f"  {label:8} prompt {runs[0][1]:4} tokens  TTFT {statistics.median(t for t, _ in runs):.3f} s")
        for parallel in (False, True) if args.samples else ():
            print(json.dumps(forced_calls(client, model, args.samples, args.max_tokens, parallel, prompts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

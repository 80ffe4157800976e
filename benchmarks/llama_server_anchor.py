"""`tunesmith serve --backend llama-cpp` against llama.cpp's own `llama-server` (llama_server_build.py: built from
the llama.cpp the pinned llama-cpp-python vendors, or the one given), on the same GGUF file with the same threads,
in interleaved rounds: the bar the backend is held to.

    .venv/bin/python benchmarks/llama_server_anchor.py [--model smollm2-135m-instruct | RUN] [--rounds 3]
        [--llama-server PATH] [--threads N] [--clients 16] [--turns 10] [--json FILE]

Per round, on each server (one computing at a time, alternating which goes first):
- batch 1: one streamed chat reply of --max-tokens tokens at each server's default sampling; decode tokens/s =
  (tokens - 1) / (time of the last token - time of the first);
- --clients clients at once, --requests streamed requests each (replies of --concurrent-max-tokens): aggregate
  tokens/s and p90 time to first token;
- a --turns-turn conversation (~60-token turns, replies of --turn-tokens): tunesmith keeps it server-side
  (`"conversation": id`), llama-server gets the whole history every turn with `cache_prompt` (its default);
  turn N's time to first token over turn 1's.
The stop tokens are banned (logit_bias), so every reply has the length asked for; every round's prompts begin with
the round's number, so nothing but the chat template's start is cached from an earlier round.

The file is the model's as `tunesmith serve --backend llama-cpp` serves it: the embedded model's own GGUF, or a
run's export at --gguf-quant (the server's default). tunesmith runs with its defaults (plus --threads);
llama-server with --parallel --clients slots sharing one KV cache (`--kv-unified`) and its defaults otherwise.
Goals (tunesmith / llama-server, median of the per-round ratios): batch-1 decode >= 0.95x, --clients throughput
>= 1.0x, their p90 time to first token <= 1.0x. The table and the raw rounds go to --json, with lscpu's model
name."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from llama_server_build import llama_server, version_of  # noqa: E402
from prefix_reuse import conversation, stop_ban  # noqa: E402
from served import free_port, machine, running, save, served  # noqa: E402
from serve_load import QUESTIONS, load, stream  # noqa: E402

SERVERS = ("tunesmith", "llama-server")
STORY = "Tell me a long story about a cat who learns to sail."
# (measure, how the ratio is read, goal): each ratio is tunesmith's over llama-server's in the same round
GOALS = [("batch-1 decode tok/s", ">=", 0.95), ("clients tok/s", ">=", 1.0), ("clients p90 TTFT s", "<=", 1.0),
         ("conversation turn 1 TTFT s", None, None), ("conversation last turn TTFT s", None, None),
         ("conversation last / first", None, None)]


def gguf_file(model: str, quant: str) -> Path:
    """The GGUF `tunesmith serve --backend llama-cpp --model MODEL` serves (a run is exported on first use)."""
    from tunesmith.serve.backends import gguf_of

    return gguf_of(model, quant)[0]


def start_llama_server(stack: contextlib.ExitStack, binary: Path, gguf: Path, threads: int, slots: int,
                       extra: list[str]) -> str:
    port = free_port()
    command = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--threads",
               str(threads), "--threads-batch", str(threads), "--parallel", str(slots), "--kv-unified", *extra]
    return stack.enter_context(running(command, f"http://127.0.0.1:{port}"))


def one_round(i: int, urls: dict, model: str, ban: dict, args) -> dict:
    """Each measure once on each server, the servers' order reversed every other round: {measure: {server: x}}."""
    order = list(urls.items())[::(-1 if i % 2 else 1)]
    out = {name: {} for name, _, _ in GOALS}

    async def batch1(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            return await stream(client, {"model": model, "messages": [{"role": "user", "content": STORY}],
                                         "max_tokens": args.max_tokens, "logit_bias": ban})
    for server, url in order:
        out["batch-1 decode tok/s"][server] = asyncio.run(batch1(url)).decode_rate
    for server, url in order:
        def messages(c, r):
            return [{"role": "user", "content": f"({i}.{c}.{r}) {QUESTIONS[(c + r) % len(QUESTIONS)]}"}]
        done = asyncio.run(load(url, model, args.clients, args.requests, args.concurrent_max_tokens, ban, messages))
        out["clients tok/s"][server], out["clients p90 TTFT s"][server] = done["tokens_per_s"], done["ttft_p90"]
    for server, url in order:
        try:
            turns = asyncio.run(conversation(url, model, f"{i}-{server}", args.turns, args.turn_tokens, ban,
                                             server_side=server == "tunesmith"))
        except httpx.TransportError as err:  # say whose connection it was (seen twice, unexplained yet)
            raise SystemExit(f"round {i + 1}: {server} broke the conversation's connection: {err!r}") from err
        out["conversation turn 1 TTFT s"][server] = turns[0].ttft
        out["conversation last turn TTFT s"][server] = turns[-1].ttft
        out["conversation last / first"][server] = turns[-1].ttft / turns[0].ttft
        out.setdefault("conversation last turn prompt/cached tokens", {})[server] = (turns[-1].prompt_tokens,
                                                                                    turns[-1].cached_tokens)
    return out


def table(rounds: list[dict]) -> list[dict]:
    """Per measure: each server's median over rounds, the median of the per-round ratios, the goal and whether it
    is met."""
    rows = []
    for name, sense, goal in GOALS:
        ratio = statistics.median(r[name]["tunesmith"] / r[name]["llama-server"] for r in rounds)
        rows.append({"measure": name, **{s: statistics.median(r[name][s] for r in rounds) for s in SERVERS},
                     "ratio": ratio, "goal": f"{sense} {goal}" if goal else "",
                     "met": None if goal is None else (ratio >= goal if sense == ">=" else ratio <= goal)})
    return rows


def print_table(rows: list[dict], rounds: list[dict], args) -> None:
    print(f"\nmedian of {args.rounds} rounds; ratio = tunesmith / llama-server, the median of the per-round ratios")
    print(f"{'measure':32} {'tunesmith':>10} {'llama-server':>12} {'ratio':>7} {'goal':>7}")
    for row in rows:
        verdict = "" if row["met"] is None else "  met" if row["met"] else "  missed"
        print(f"{row['measure']:32} {row['tunesmith']:10.3f} {row['llama-server']:12.3f} {row['ratio']:6.2f}x "
              f"{row['goal']:>7}{verdict}")
    last = rounds[-1]["conversation last turn prompt/cached tokens"]
    print(f"conversation turn {args.turns}, last round: " + ", ".join(
        f"{s} {p} prompt tokens, {c} cached" for s, (p, c) in last.items()))


def parse(argv) -> argparse.Namespace:
    from tunesmith.export.cache import GGUF_QUANT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model or a run directory")
    parser.add_argument("--gguf-quant", default=GGUF_QUANT, help="the type a run is exported at (default: "
                        f"{GGUF_QUANT}, the server's)")
    parser.add_argument("--llama-server", help="this llama-server binary (default: PATH's, else the cached build)")
    parser.add_argument("--jobs", type=int, default=2, help="compile jobs when llama-server is built")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of both servers (default: every core this process may use)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128, help="the batch-1 reply's tokens")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--concurrent-max-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=60, help="tokens of each reply in the conversation")
    parser.add_argument("--serve-args", default="", help="more `tunesmith serve` options, e.g. '--max-batch 16'")
    parser.add_argument("--llama-args", default="", help="more llama-server options")
    parser.add_argument("--json", type=Path, default=Path("llama_server_anchor.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from tunesmith.models import EMBEDDED

    args = parse(argv)
    binary = llama_server(args.llama_server, args.jobs)
    gguf = gguf_file(args.model, args.gguf_quant)
    ban = stop_ban(args.model)
    info = {**machine(), "llama_server": str(binary), "llama_server_version": version_of(binary),
            "llama_cpp_python": __import__("llama_cpp").__version__, "gguf": str(gguf)}
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load']:.1f}; {args.threads} threads "
          f"each; model {args.model}, file {gguf.name}; llama-server {info['llama_server_version']}")
    quant = () if args.model in EMBEDDED else ("--gguf-quant", args.gguf_quant)
    with contextlib.ExitStack() as stack:
        urls = {"tunesmith": stack.enter_context(served(args.model, "--backend", "llama-cpp", "--threads",
                                                        str(args.threads), *quant, *shlex.split(args.serve_args))),
                "llama-server": start_llama_server(stack, binary, gguf, args.threads, args.clients,
                                                   shlex.split(args.llama_args))}
        for url in urls.values():  # warm-up: first requests allocate
            asyncio.run(load(url, args.model, 1, 1, 4, ban))
        rounds = []
        for i in range(args.rounds):
            rounds.append(one_round(i, urls, args.model, ban, args))
            print(f"round {i + 1} (tunesmith / llama-server): " + "; ".join(
                f"{name} {r['tunesmith']:.2f} / {r['llama-server']:.2f}" for name, r in rounds[-1].items()
                if isinstance(r["tunesmith"], float)), flush=True)
    rows = table(rounds)
    print_table(rows, rounds, args)
    save(args.json, info, args, table=rows, rounds=rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

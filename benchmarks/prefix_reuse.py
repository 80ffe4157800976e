"""What the prefix cache buys (`--prefix-cache-mb`, default on), on both backends, in interleaved rounds:

(a) a 10-turn server-side conversation (`"conversation": id`; ~60-token user turns, replies of --turn-tokens,
    streamed): the time to first token of every turn, and turn 10's over turn 1's (goal: at most 1.5x with the
    defaults; without the cache it grows with the history, which is prefilled again every turn);
(b) 16 clients at once sharing a ~500-token system prompt, each with its own short question: p90 time to first
    token with the cache on (the default) against `--prefix-cache-mb 0` (goal: at least 2x lower).

    .venv/bin/python benchmarks/prefix_reuse.py [--model smollm2-135m-instruct] [--backends torch,llama-cpp]
        [--rounds 3] [--turns 10] [--turn-tokens 60] [--clients 16] [--max-tokens 32] [--json FILE]

Each backend runs twice, with the cache on and off, all servers up from the start and otherwise at their
defaults; every round runs each workload on each server, one server computing at a time, alternating which goes
first. Every round's conversation and questions begin with the round's number, so nothing but the system prompt
and the template's own start is ever in the cache from an earlier round. Before the rounds each server answers
one request with the shared system prompt: (b) measures an app's running server, which has seen its system
prompt before. The usage's `prompt_tokens_details.cached_tokens` is reported beside each figure."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from served import machine, save, served  # noqa: E402
from serve_load import QUESTIONS, Streamed, load, p90, stream  # noqa: E402

TOPICS = ["the harbour where the boat was built", "the first morning at sea", "the storm on the third night",
          "the island with the lighthouse", "the broken mast", "the map found in the cargo hold",
          "the dolphins that followed the ship", "the pirate flag on the horizon", "the quiet week without wind",
          "the return to the harbour"]
RULES = ["Greet the customer by name when the name is known, and thank them for their patience.",
         "Never promise a refund before the order has been checked in the order system.",
         "Ask for the order number when it is missing; it has the form NW- followed by five digits.",
         "Orders ship within two working days; express orders ship on the same day when placed before noon.",
         "Returns are accepted within thirty days of delivery, in the original packaging, with the receipt.",
         "Damaged or wrong items are replaced at no cost; the customer keeps the damaged item.",
         "An address can be changed until the order ships; after that, the courier must be contacted.",
         "The shop is open from nine to six, Monday to Saturday, and closed on public holidays.",
         "Answer in the language the customer writes in, and keep the answer under five sentences.",
         "Do not share the details of one customer's order with anyone else, even a family member.",
         "Gift cards cannot be exchanged for cash and are valid for two years from the date of purchase.",
         "Bicycles bought in the shop get a free safety check within the first three months.",
         "Electric bicycles have a two-year warranty on the battery and five years on the frame.",
         "Repairs take three to five working days; the customer is called when the bicycle is ready.",
         "Spare parts not in stock can be ordered; they arrive within a week and are paid on collection.",
         "Price matching applies to the same model from a shop in the same country, shown on its website.",
         "Students get ten percent off accessories with a valid student card, not on bicycles.",
         "Test rides are free and need an identity card left at the counter during the ride.",
         "Helmets cannot be returned once worn, for hygiene reasons, unless they are faulty.",
         "Complaints that cannot be solved in the chat are passed to the shop manager within one day.",
         "Never guess: when a policy does not cover the question, say so and offer to pass it on.",
         "Close each answer by asking whether there is anything else the customer needs."]
SYSTEM = ("You are the support assistant of a bicycle shop. Follow these rules in every answer.\n"
          + "\n".join(f"{i + 1}. {rule}" for i, rule in enumerate(RULES)))  # ~500 tokens (SmolLM2's tokenizer)


def user_turn(tag: str, turn: int) -> dict:
    """Turn `turn` (from 0) of conversation `tag`: ~60 tokens that begin with the tag, so no two share a prefix."""
    return {"role": "user", "content": (
        f"Conversation {tag}, turn {turn + 1}: continue the story with {TOPICS[turn % len(TOPICS)]}. Say what the "
        "sailors saw, how the weather changed during the day and what they decided to do next. Keep the names "
        "from before and add one new detail about the ship or its crew.")}


async def conversation(url: str, model: str, tag: str, turns: int, max_tokens: int, ban: dict,
                       server_side: bool = True) -> list[Streamed]:
    """Each turn of a `turns`-turn conversation, streamed one after another. `server_side`: tunesmith keeps the
    history (`"conversation": id`, only the new turn is sent); otherwise the client resends it every turn, as any
    OpenAI client does (and as llama-server's `cache_prompt` expects). Each turn on a connection of its own:
    llama-server (cpp-httplib) closes a kept-alive connection after a few requests, and a streamed turn sent on it
    then broke with RemoteProtocolError in some rounds (llama_server_anchor.py)."""
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=fresh) as client:
        if server_side:
            created = await client.post("/v1/conversations", json={"model": model})
            created.raise_for_status()
            cid = created.json()["id"]
        history, replies = [], []
        for turn in range(turns):
            new = user_turn(tag, turn)
            body = {"conversation": cid, "messages": [new]} if server_side else {"messages": [*history, new]}
            replies.append(await stream(client, {**body, "model": model, "max_tokens": max_tokens,
                                                 "logit_bias": ban}))
            history += [new, {"role": "assistant", "content": replies[-1].text}]
    return replies


def shared_prompt(tag: str):
    """The messages of client c's request r: the shared system prompt, then a question of its own."""
    return lambda c, r: [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Question {tag}.{c}.{r}: {QUESTIONS[c % len(QUESTIONS)]}"}]


def one_round(i: int, servers: dict, model: str, ban: dict, args) -> dict:
    """Every workload once on every server ({(backend, cache): url}), the servers' order reversed every other
    round: {"backend/cache": {"turns": [...], "shared": {...}}}."""
    order = list(servers.items())[::(-1 if i % 2 else 1)]
    out = {f"{backend}/{cache}": {} for backend, cache in servers}
    for (backend, cache), url in order:
        turns = asyncio.run(conversation(url, model, f"{i}-{backend}-{cache}", args.turns, args.turn_tokens, ban))
        out[f"{backend}/{cache}"]["turns"] = [{"ttft": t.ttft, "prompt_tokens": t.prompt_tokens,
                                               "cached_tokens": t.cached_tokens, "tokens": t.tokens} for t in turns]
    for (backend, cache), url in order:
        out[f"{backend}/{cache}"]["shared"] = asyncio.run(load(url, model, args.clients, args.requests,
                                                               args.max_tokens, ban, shared_prompt(str(i))))
    return out


def summary(rounds: list[dict], turns: int) -> dict:
    """Per server the medians over rounds: turn 1's and turn N's TTFT and their ratio (per round, then the median),
    and (b)'s p90 TTFT; per backend the off/on ratio of (b)'s p90 TTFT (per round, then the median)."""
    out = {}
    for key in rounds[0]:
        ttft = [[t["ttft"] for t in r[key]["turns"]] for r in rounds]
        out[key] = {"turn_1_ttft": statistics.median(t[0] for t in ttft),
                    f"turn_{turns}_ttft": statistics.median(t[-1] for t in ttft),
                    "last_over_first": statistics.median(t[-1] / t[0] for t in ttft),
                    "last_turn_cached_tokens": statistics.median(r[key]["turns"][-1]["cached_tokens"] for r in rounds),
                    "shared_ttft_p90": statistics.median(r[key]["shared"]["ttft_p90"] for r in rounds),
                    "shared_cached_tokens": statistics.median(r[key]["shared"]["cached_tokens"] for r in rounds),
                    "shared_prompt_tokens": statistics.median(r[key]["shared"]["prompt_tokens"] for r in rounds)}
    for backend in {key.split("/")[0] for key in rounds[0]}:
        if f"{backend}/off" in rounds[0]:
            out[f"{backend}/off_over_on_p90"] = statistics.median(
                r[f"{backend}/off"]["shared"]["ttft_p90"] / r[f"{backend}/on"]["shared"]["ttft_p90"] for r in rounds)
    return out


def report(s: dict, backends: list[str], args) -> None:
    print(f"\n(a) {args.turns}-turn server-side conversation, ~60-token turns, replies of {args.turn_tokens} tokens; "
          f"median of {args.rounds} rounds (goal with the cache on: turn {args.turns} / turn 1 <= 1.5x)")
    print(f"{'server':20} {'turn 1 TTFT':>11} {f'turn {args.turns} TTFT':>12} {'ratio':>7} {'cached (last turn)':>19}")
    for backend in backends:
        for cache in ("on", "off"):
            r = s[f"{backend}/{cache}"]
            print(f"{backend + ' cache ' + cache:20} {r['turn_1_ttft']:10.3f}s {r[f'turn_{args.turns}_ttft']:11.3f}s "
                  f"{r['last_over_first']:6.2f}x {r['last_turn_cached_tokens']:19.0f}"
                  + ("  goal met" if cache == "on" and r["last_over_first"] <= 1.5 else
                     "  goal missed" if cache == "on" else ""))
    print(f"\n(b) {args.clients} clients at once, a shared system prompt (~500 tokens) and a question each, "
          f"{args.requests} request(s) per client, replies of {args.max_tokens} tokens (goal: off / on >= 2x)")
    print(f"{'backend':10} {'p90 TTFT on':>12} {'p90 TTFT off':>13} {'off / on':>9} {'prompt':>7} {'cached (on)':>12}")
    for backend in backends:
        on, off, ratio = s[f"{backend}/on"], s[f"{backend}/off"], s[f"{backend}/off_over_on_p90"]
        print(f"{backend:10} {on['shared_ttft_p90']:11.3f}s {off['shared_ttft_p90']:12.3f}s {ratio:8.2f}x "
              f"{on['shared_prompt_tokens']:7.0f} {on['shared_cached_tokens']:12.0f}"
              f"  goal {'met' if ratio >= 2 else 'missed'}")


def stop_ban(model: str) -> dict[str, float]:
    """logit_bias that bans the model's stop tokens, so every reply has exactly max_tokens tokens."""
    from tunesmith.data.tokenize import stop_token_ids
    from tunesmith.models import load_generation_config, load_tokenizer

    return {str(t): -100.0 for t in sorted(stop_token_ids(load_tokenizer(model), load_generation_config(model)))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model or a run directory")
    parser.add_argument("--backends", default="torch,llama-cpp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=60, help="tokens of each reply in the conversation")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1, help="requests per client in (b)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens of each reply in (b)")
    parser.add_argument("--json", type=Path, default=Path("prefix_reuse.json"), help="where the raw rounds go")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    ban = stop_ban(args.model)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load']:.1f}; model {args.model}")
    with contextlib.ExitStack() as stack:
        servers = {(backend, cache): stack.enter_context(served(args.model, "--backend", backend, *(
            ("--prefix-cache-mb", "0") if cache == "off" else ()))) for backend in backends for cache in ("on", "off")}
        for url in servers.values():  # warm-up: the model's first request, and (b)'s system prompt seen once
            asyncio.run(load(url, args.model, 1, 1, 4, ban, shared_prompt("warm-up")))
        rounds = []
        for i in range(args.rounds):
            rounds.append(one_round(i, servers, args.model, ban, args))
            print(f"round {i + 1}: " + ", ".join(
                f"{key} turn 1/{args.turns} {r['turns'][0]['ttft']:.2f}/{r['turns'][-1]['ttft']:.2f}s "
                f"p90 {r['shared']['ttft_p90']:.2f}s" for key, r in rounds[-1].items()), flush=True)
    s = summary(rounds, args.turns)
    report(s, backends, args)
    save(args.json, info, args, summary=s, rounds=rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

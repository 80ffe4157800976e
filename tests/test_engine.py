"""The one generation engine: the same text on every path (generate, stream, generate_batch, the terminal chat,
the server over HTTP) for sampled and seeded settings; rows that do not depend on their batch-mates; continuous
batching (admission mid-decode, cancelled and failed rows leave alone); the token-mask hook; exact stops."""

from __future__ import annotations

import io
import json
import threading
import warnings

import pytest
from serve_assets import write_base, write_run

PROMPT = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def assets(bpe, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = write_base(bpe, root / "base")
    return {"base": base, "lora": write_run(base, root / "lora", "lora"),
            "prefix": write_run(base, root / "prefix", "prefix_tuning")}


@pytest.fixture(scope="module")
def offline(assets):
    """(model, tokenizer) of the LoRA run, loaded as `tunesmith generate` loads it."""
    from tunesmith.models import load

    return load(str(assets["lora"]))


@pytest.fixture(scope="module")
def server(assets):
    """(engine, client): the base and the LoRA run served by one engine, the LoRA rows mixed with base rows."""
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app, load_engine

    engine = load_engine(str(assets["base"]), {"lora": str(assets["lora"])})
    engine.models = {"base" if k == str(assets["base"]) else k: v for k, v in engine.models.items()}  # short name
    with TestClient(create_app(engine, ServeSettings())) as client:
        yield engine, client
    engine.stop()


def no_eos(tokenizer) -> dict:
    return {tokenizer.eos_token_id: -100.0}


def collect(engine, specs: list[tuple[str, list[int], object]], *, timeout: float = 60) -> list[dict]:
    """Submit (model, ids, params) requests in one call; per request its text, finish reason and error."""
    from tunesmith.generation import Request

    out = [{"text": "", "finish": None, "error": None, "events": 0} for _ in specs]
    done = threading.Semaphore(0)

    def emit(event):
        row = out[event.index]
        row["text"] += event.text
        row["events"] += 1
        row["error"] = event.error
        row["finish"] = event.finish_reason
        if event.finish_reason or event.error:
            done.release()

    engine.submit([Request(model, ids, params, emit, index=i) for i, (model, ids, params) in enumerate(specs)])
    for _ in specs:
        assert done.acquire(timeout=timeout)
    return out


# -- the same text on every path --------------------------------------------------------------------------------

SETTINGS = {
    "sampled": dict(temperature=0.9, seed=7),
    "nucleus and penalties": dict(temperature=1.2, top_p=0.8, presence_penalty=0.6, frequency_penalty=0.4, seed=11),
    "greedy": dict(temperature=0.0),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_text_from_generate_stream_batch_chat_and_the_server(offline, server, name):
    from tunesmith.generation import SamplingParams, generate, generate_batch, stream
    from tunesmith.cli.chat import chat_repl

    model, tokenizer = offline
    engine, client = server
    params = SamplingParams(max_new_tokens=16, n=2, **SETTINGS[name])
    first, second = params.choices()
    # choice j is seeded with seed + j on every path
    expected = [generate(model, tokenizer, messages=MESSAGES, params=p).text for p in (first, second)]
    assert "".join(stream(model, tokenizer, messages=MESSAGES, params=first)) == expected[0]
    batch = generate_batch(model, tokenizer, [{"messages": MESSAGES}, {"prompt": "Hello"}], params=params)
    assert [g.text for g in batch[:2]] == expected
    repl = chat_repl(model, tokenizer, params=first, stdin=io.StringIO(f"{PROMPT}\n"), stdout=io.StringIO())
    assert repl[-1] == {"role": "assistant", "content": expected[0]}
    body = {"model": "lora", "messages": MESSAGES, "max_tokens": 16, "n": 2,
            **{k: v for k, v in SETTINGS[name].items()}}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert [c["message"]["content"] for c in reply["choices"]] == expected
    chunks = client.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n")
    streamed = ["", ""]
    for chunk in chunks[:-2]:  # the last two: "data: [DONE]" and ""
        for choice in json.loads(chunk.removeprefix("data: "))["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content", "")
    assert streamed == expected


def test_stop_strings_and_logit_bias_agree_on_every_path(offline, server):
    from tunesmith.generation import SamplingParams, generate, generate_batch, prompt_ids

    model, tokenizer = offline
    engine, client = server
    base = dict(max_new_tokens=20, temperature=0.8, seed=5, logit_bias=no_eos(tokenizer))
    free = generate(model, tokenizer, prompt=PROMPT, params=SamplingParams(**base)).text
    stop = free[6:8]
    assert stop and stop in free
    params = SamplingParams(**base, stop=[stop])
    cut = generate(model, tokenizer, prompt=PROMPT, params=params)
    assert cut.text == free[:free.find(stop)] and cut.finish_reason == "stop"
    assert generate_batch(model, tokenizer, [{"prompt": PROMPT}], params=params)[0].text == cut.text
    served = collect(engine, [("lora", prompt_ids(tokenizer, prompt=PROMPT), params)])[0]
    assert (served["text"], served["finish"]) == (cut.text, "stop")
    body = {"model": "lora", "prompt": PROMPT, "max_tokens": 20, "temperature": 0.8, "seed": 5, "stop": [stop],
            "logit_bias": {str(k): v for k, v in no_eos(tokenizer).items()}}
    reply = client.post("/v1/completions", json=body)
    assert reply.json()["choices"][0]["text"] == cut.text


def test_a_seeded_row_ignores_its_batch_mates(server):
    from tunesmith.generation import prompt_ids
    from tunesmith.generation import SamplingParams

    engine, _ = server
    ids = prompt_ids(engine.tokenizer, prompt=PROMPT)
    mine = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, logit_bias=no_eos(engine.tokenizer))
    alone = collect(engine, [("lora", ids, mine)])[0]["text"]
    others = [("base", prompt_ids(engine.tokenizer, prompt=p), SamplingParams(max_new_tokens=n, temperature=1.0))
              for p, n in [("Q", 3), ("Review: boring. Sentiment: a long one", 20), ("Hello", 7)]]
    together = collect(engine, [others[0], ("lora", ids, mine), *others[1:]])
    assert together[1]["text"] == alone and not any(r["error"] for r in together)


# -- continuous batching ------------------------------------------------------------------------------------------

def test_a_request_joins_a_running_batch_and_both_match_their_solo_runs(server):
    from tunesmith.generation import prompt_ids
    from tunesmith.generation import Request, SamplingParams

    engine, _ = server
    tokenizer = engine.tokenizer
    long = SamplingParams(max_new_tokens=30, logit_bias=no_eos(tokenizer))
    short = SamplingParams(max_new_tokens=4, temperature=1.0, seed=9, logit_bias=no_eos(tokenizer))
    a_ids, b_ids = prompt_ids(tokenizer, prompt=PROMPT), prompt_ids(tokenizer, prompt="Hello")
    solo = [collect(engine, [("base", a_ids, long)])[0]["text"], collect(engine, [("lora", b_ids, short)])[0]["text"]]

    order, texts, done = [], {"a": "", "b": ""}, threading.Semaphore(0)

    def emitter(name):
        def emit(event):
            texts[name] += event.text
            order.append((name, event.finish_reason or event.error))
            if name == "a" and len(order) == 3:  # A is mid-decode: B arrives now
                engine.submit([Request("lora", b_ids, short, emitter("b"))])
            if event.finish_reason or event.error:
                done.release()
        return emit

    engine.submit([Request("base", a_ids, long, emitter("a"))])
    assert done.acquire(timeout=60) and done.acquire(timeout=60), order
    assert order.index(("b", "length")) < order.index(("a", "length"))  # B finished while A still ran
    assert [texts["a"], texts["b"]] == solo


def test_cancelled_rows_leave_at_once_and_the_others_go_on(server, monkeypatch):
    from tunesmith.generation import prompt_ids
    from tunesmith.generation import Request, SamplingParams

    engine, _ = server
    tokenizer = engine.tokenizer
    params = SamplingParams(max_new_tokens=12, logit_bias=no_eos(tokenizer))
    ids = prompt_ids(tokenizer, prompt=PROMPT)
    alone = collect(engine, [("base", ids, params)])[0]["text"]
    sizes, step = [], engine.decoder.step
    events, finished = [], threading.Event()
    monkeypatch.setattr(engine.decoder, "step", lambda rows: (sizes.append((len(events), len(rows))), step(rows))[1])

    def cancelling(event):
        events.append(event)
        cancelled.cancelled.set()  # the client hangs up after the first piece

    cancelled = Request("base", ids, SamplingParams(max_new_tokens=12, logit_bias=no_eos(tokenizer)), cancelling)
    texts = []
    keep = Request("base", ids, params, lambda e: (texts.append(e.text), e.finish_reason and finished.set()))
    engine.submit([cancelled, keep])
    assert finished.wait(60)
    assert "".join(texts) == alone
    assert len(events) == 1 and events[0].finish_reason is None  # not a word after the cancel
    assert {size for cancels, size in sizes if cancels} == {1}  # every step after the cancel: one row


def test_a_failing_row_fails_alone(server):
    from tunesmith.generation import prompt_ids
    from tunesmith.generation import SamplingParams

    engine, _ = server
    ids = prompt_ids(engine.tokenizer, prompt=PROMPT)
    params = SamplingParams(max_new_tokens=6)
    alone = collect(engine, [("base", ids, params)])[0]
    results = collect(engine, [("base", ids, params), ("base", ids, SamplingParams(logit_bias={10**6: 1.0})),
                               ("nope", ids, params), ("base", [], params), ("lora", ids, params)])
    assert results[0]["text"] == alone["text"] and results[0]["error"] is None
    assert "logit_bias names token id 1000000" in results[1]["error"]
    assert "not served" in results[2]["error"] and "no tokens" in results[3]["error"]
    assert results[4]["error"] is None

    from tunesmith.generation import Request as R

    boom, seen = threading.Event(), []

    def broken(event):
        raise RuntimeError("the client's callback broke")

    ok = R("base", ids, params, lambda e: (seen.append(e), e.finish_reason and boom.set()))
    engine.submit([R("base", ids, params, broken), ok])
    assert boom.wait(60) and "".join(e.text for e in seen) == alone["text"]


def test_zero_max_tokens_ends_after_the_prompt_and_length_ends_with_an_empty_event(server):
    from tunesmith.generation import prompt_ids
    from tunesmith.generation import Request, SamplingParams

    engine, _ = server
    ids = prompt_ids(engine.tokenizer, prompt=PROMPT)
    events, done = [], threading.Semaphore(0)

    def emit(event):
        events.append(event)
        if event.finish_reason:
            done.release()

    params = SamplingParams(max_new_tokens=4, logit_bias=no_eos(engine.tokenizer))
    engine.submit([Request("base", ids, SamplingParams(max_new_tokens=0), emit, index=0),
                   Request("base", ids, params, emit, index=1)])
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    zero = [e for e in events if e.index == 0]
    assert len(zero) == 1 and zero[0].finish_reason == "length" and zero[0].completion_tokens == 0
    four = [e for e in events if e.index == 1]
    # as OpenAI streams it: the last text comes before the finish, which carries none
    assert four[-1].finish_reason == "length" and four[-1].text == "" and four[-1].completion_tokens == 4
    assert four[-2].text


def test_prompt_logprobs_score_each_prompt_token_as_one_forward_pass_does(server):
    """echo + logprobs (lm-evaluation-harness's multiple choice): every prompt token's logprob given the ones
    before it, in a left-padded batch, equal to the unpadded forward pass; max_tokens 0 ends there."""
    import torch

    from tunesmith.generation import prompt_ids
    from tunesmith.generation import Request, SamplingParams

    engine, _ = server
    model = engine.models["base"].module
    prompts = [prompt_ids(engine.tokenizer, prompt=p) for p in (PROMPT, "Q: 2+2?\nA: 4")]
    events, done = [], threading.Semaphore(0)

    def emit(event):
        events.append(event)
        if event.finish_reason or event.error:
            done.release()

    engine.submit([Request("base", ids, SamplingParams(max_new_tokens=n, prompt_logprobs=2), emit, index=i)
                   for i, (ids, n) in enumerate(zip(prompts, (0, 1)))])
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    for i, ids in enumerate(prompts):
        mine = [e for e in events if e.index == i]
        assert mine[0].prompt is not None and mine[0].prompt[0] is None and len(mine[0].prompt) == len(ids)
        with torch.inference_mode(), model.disable_adapter():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        expected = [float(logp[k - 1, t]) for k, t in enumerate(ids) if k]
        assert [t.logprob for t in mine[0].prompt[1:]] == pytest.approx(expected, abs=1e-4)
        assert all(len(t.top) == 2 and t.top[0][1] >= t.logprob - 1e-6 for t in mine[0].prompt[1:])
        assert mine[-1].finish_reason == "length" and mine[-1].completion_tokens == i  # max_tokens 0, then 1


# -- adapters through the KV cache ----------------------------------------------------------------------------------

def test_prefix_tuning_rows_decode_with_base_rows_and_match_their_solo_runs(assets, monkeypatch):
    """Prefix tuning's virtual keys and values start the row's cache; from then on the row is a plain forward of
    the base, so it shares decode steps with the base model's rows."""
    from tunesmith.generation import SamplingParams, generate, prompt_ids
    from tunesmith.models import load
    from tunesmith.serve import load_engine

    engine = load_engine(str(assets["base"]), {"prefix": str(assets["prefix"])})
    engine.models = {"base" if k == str(assets["base"]) else k: v for k, v in engine.models.items()}
    sizes, step = [], engine.decoder.step
    monkeypatch.setattr(engine.decoder, "step", lambda rows: (sizes.append(len(rows)), step(rows))[1])
    params = SamplingParams(max_new_tokens=8, logit_bias=no_eos(engine.tokenizer))
    ids = prompt_ids(engine.tokenizer, messages=MESSAGES)
    try:
        together = collect(engine, [("prefix", ids, params), ("base", ids, params), ("prefix", ids, params)])
    finally:
        engine.stop()
    assert sizes[0] == 3  # one forward pass for all three rows
    model, tokenizer = load(str(assets["prefix"]))
    offline = generate(model, tokenizer, messages=MESSAGES, params=params).text
    assert together[0]["text"] == together[2]["text"] == offline
    with model.disable_adapter():
        assert together[1]["text"] == generate(model, tokenizer, messages=MESSAGES, params=params).text
    assert together[0]["text"] != together[1]["text"]


def test_the_cache_goes_in_as_cache_without_deprecation_warnings(assets, tiny_lm, chatml_tokenizer):
    from tunesmith.generation import SamplingParams, generate
    from tunesmith.models import load

    prefix, tokenizer = load(str(assets["prefix"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        generate(tiny_lm, chatml_tokenizer, prompt="Hello", params=SamplingParams(max_new_tokens=4))
        generate(prefix, tokenizer, prompt="Hello", params=SamplingParams(max_new_tokens=4))


# -- prefix reuse ---------------------------------------------------------------------------------------------------

def test_the_prefix_cache_keeps_the_longest_prefixes_within_its_budget_least_recently_used_out():
    from tunesmith.generation.prefix_cache import PrefixCache

    evicted = []
    cache = PrefixCache(100, evict=evicted.append)
    assert cache.put("a", [1, 2, 3], "A", 40) and cache.put("b", [1, 2, 3, 4], "B", 40)
    assert cache.longest("a", [1, 2, 3, 4, 5], limit=4) == (cache.entries[-1], 3)  # never another key's
    assert cache.longest("a", [1, 2, 3], limit=2)[1] == 2  # the caller leaves tokens to compute
    assert not cache.put("a", [1, 2], "covered", 10) and evicted == []  # nothing new: the payload stays the caller's
    assert cache.put("a", [1, 2, 3, 9], "A2", 70)  # extends A, which goes; then B (least recently used) for room
    assert evicted == ["A", "B"] and [e.payload for e in cache.entries] == ["A2"] and cache.used == 70
    assert cache.longest("a", [1, 2, 4], limit=9)[1] == 2 and cache.longest("a", [7], limit=9) == (None, 0)
    assert not cache.put("a", [5], "too big", 101) and cache.tokens == 4


def ask(engine, model: str, messages: list[dict], max_tokens: int = 8) -> tuple[str, int, int]:
    """(greedy reply, prompt tokens, prompt tokens from the prefix cache) of one chat turn."""
    from tunesmith.generation import Request, SamplingParams, prompt_ids

    ids, events = prompt_ids(engine.tokenizer, messages=messages), []
    engine.submit([Request(model, ids, SamplingParams(max_new_tokens=max_tokens,
                                                      logit_bias=no_eos(engine.tokenizer)), events.append)])
    while engine.busy:
        engine.step()
    assert events[-1].finish_reason, events
    return "".join(e.text for e in events), len(ids), events[-1].cached_tokens


def test_prefix_reuse_gives_the_same_greedy_turns_per_adapter(assets):
    """A conversation's turns on the base, a LoRA run and a prefix-tuning run: each turn after the first reads
    the history from the cache of its own model only (prefix tuning's virtual tokens are not cached), and every
    reply is the one the engine gives without a cache."""
    from tunesmith.serve import load_engine

    turns = {}
    for mb in (256, 0):
        engine = load_engine(str(assets["base"]), {"lora": str(assets["lora"]), "prefix": str(assets["prefix"])},
                             prefix_cache_mb=mb)
        engine.threaded = False
        for model in ("base", "lora", "prefix"):
            history = []
            for question in ("Hello", "What is 2+2?", "Thanks"):
                history.append({"role": "user", "content": question})
                turn = ask(engine, model if model != "base" else next(iter(engine.models)), history)
                turns.setdefault((mb, model), []).append(turn)
                history.append({"role": "assistant", "content": turn[0]})
    for model in ("base", "lora", "prefix"):
        assert [t[0] for t in turns[256, model]] == [t[0] for t in turns[0, model]]
        assert [t[2] for t in turns[0, model]] == [0, 0, 0]
    for model in ("base", "lora"):
        (_, _, none), *later = turns[256, model]
        assert none == 0  # the same first question as the base's: never another adapter's KV
        for (_, before, _), (_, prompt, cached) in zip(turns[256, model], later):
            assert before <= cached < prompt
    assert [t[2] for t in turns[256, "prefix"]] == [0, 0, 0]
    assert len({tuple(t[0] for t in turns[256, m]) for m in ("base", "lora", "prefix")}) == 3  # three models


def test_a_run_served_again_under_its_name_does_not_reuse_the_old_ones_cache(assets):
    from tunesmith.generation import Served
    from tunesmith.serve import load_engine

    engine = load_engine(str(assets["base"]), {"lora": str(assets["lora"])})
    engine.threaded = False
    reply, prompt, _ = ask(engine, "lora", MESSAGES)
    assert ask(engine, "lora", MESSAGES) == (reply, prompt, prompt - 1)
    old = engine.models["lora"]
    engine.models = {**engine.models, "lora": Served(old.module, old.adapter, run=old.run)}  # e.g. loaded again
    assert ask(engine, "lora", MESSAGES) == (reply, prompt, 0)
    del old
    engine.models = {k: v for k, v in engine.models.items() if k != "lora"}
    ask(engine, next(iter(engine.models)), MESSAGES)
    assert {entry.key for entry in engine.decoder.prefixes.entries} == {engine.models[next(iter(engine.models))].uid}


# -- the sampler's hooks and text handling ----------------------------------------------------------------------------

class OnlyThese:
    """A trivial token mask: only the given ids, and it records what the sampler told it."""

    def __init__(self, ids: list[int], vocab: int):
        import torch

        self.mask = torch.zeros(vocab, dtype=torch.bool)
        self.mask[ids] = True
        self.advanced: list[int] = []
        self.rows = []

    def allowed(self, row):
        self.rows.append(len(row.tokens))
        return self.mask

    def advance(self, token: int) -> None:
        self.advanced.append(token)


def test_the_token_mask_hook_restricts_every_token(tiny_lm, chatml_tokenizer):
    from tunesmith.generation import SamplingParams, generate

    allowed = chatml_tokenizer.convert_tokens_to_ids(["ĠParis", "Ġcapital", "Ġthe"])
    vocab = tiny_lm.get_output_embeddings().weight.shape[0]
    made: list[OnlyThese] = []
    factory = lambda: made.append(OnlyThese(allowed, vocab)) or made[-1]  # noqa: E731
    out = generate(tiny_lm, chatml_tokenizer, prompt="Hello",
                   params=SamplingParams(max_new_tokens=6, temperature=1.0, seed=1, token_mask=factory))
    (mask,) = made
    assert mask.advanced and set(mask.advanced) <= set(allowed)
    assert mask.rows == list(range(6))  # asked before each token, with the row's tokens so far
    assert out.text == chatml_tokenizer.decode(mask.advanced)
    nothing = lambda: OnlyThese([], vocab)  # noqa: E731  # a mask that cannot go on ends the reply, saying so
    stuck = generate(tiny_lm, chatml_tokenizer, prompt="Hello", params=SamplingParams(token_mask=nothing))
    assert (stuck.text, stuck.finish_reason, stuck.completion_tokens) == ("", "grammar_error", 0)


def test_top_k_one_is_greedy_and_sampling_settings_are_checked(tiny_lm, chatml_tokenizer):
    from tunesmith.generation import SamplingParams, generate

    greedy = generate(tiny_lm, chatml_tokenizer, prompt="Hello", params=SamplingParams(max_new_tokens=8))
    top1 = generate(tiny_lm, chatml_tokenizer, prompt="Hello",
                    params=SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=4))
    assert top1.text == greedy.text
    with pytest.raises(ValueError, match="top_p 0 must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="generate_batch"):
        generate(tiny_lm, chatml_tokenizer, prompt="Hello", params=SamplingParams(n=2))


@pytest.mark.parametrize("pieces, stops, expected", [
    (["Hello w"], ["world!"], ["Hello "]),  # only the tail that may begin a stop string waits
    (["Hello w", "ide"], ["world!"], ["Hello ", "wide"]),
    (["ab"], ["xyz"], ["ab"]),  # nothing that could begin a stop string: nothing held
])
def test_the_stop_scanner_holds_back_only_what_could_begin_a_stop(pieces, stops, expected):
    from tunesmith.generation import StopScanner

    scanner = StopScanner(stops)
    assert [scanner.feed(p) for p in pieces] == expected


def test_detokenizer_pieces_join_to_the_full_text_without_half_characters(chatml_tokenizer):
    from tunesmith.generation import Detokenizer

    ids = chatml_tokenizer("naïve 😀 café, Paris<|im_end|> ok", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(chatml_tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == chatml_tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens carried only part of a character


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_on_the_gpu_generate_and_the_server_agree(assets):
    from tunesmith.generation import SamplingParams, generate, prompt_ids
    from tunesmith.generation.device import place
    from tunesmith.models import load
    from tunesmith.serve import load_engine

    model, tokenizer = load(str(assets["lora"]))
    model = place(model, "cuda")
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=2)
    offline = generate(model, tokenizer, messages=MESSAGES, params=params).text
    engine = load_engine(str(assets["base"]), {"lora": str(assets["lora"])}, device="cuda")
    try:
        served = collect(engine, [("lora", prompt_ids(tokenizer, messages=MESSAGES), params)])[0]["text"]
    finally:
        engine.stop()
    assert served == offline

"""Every model family through tunesmith's loop, each on a tiny random model with its real chat template and
special tokens (tests/families.py): the family table finds the family from the saved config; `data preview` and
the loss mask label exactly each reply and its end-of-turn token; LoRA trains only its adapters; full training
learns a reply and where it ends, which `eval` scores and the torch server answers, stopping at the family's
end-of-turn token; the llama-cpp server, on the run's f16 GGUF, answers exactly as the torch server does;
`export --merge` writes a standalone model of the same family with the LoRA run's outputs; and the Ollama Modelfile
TEMPLATE of the family table writes what the chat template writes.

One parametrised suite: a family is one entry in tests/families.py's TINY; each tiny model is built and trained
once per session. GGUF export and its verification are tested with the GGUF exporter (test_gguf_families.py)."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from families import TINY, Tiny, build, tokenizer_for
from gotemplate import ollama_values, render
from test_tokenize import ids
from test_tool_masks import learnable_spans, learned_ids, span_after
from test_train import LORA_TRAINABLE, logits, run_train, write_jsonl

from tunesmith.data.tokenize import IGNORE_INDEX, encode_chat_prompt, tokenize_chat
from tunesmith.export import has_converters, has_llama_cpp
from tunesmith.families import CONVENTIONS, FAMILIES, TODAY, UnknownFamilyError, convention_of, family_of

# No system message: Gemma 2's template refuses one, and SmolLM3 then prints its default system prompt.
CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "How can I help you today?"}]
SYSTEM = {"role": "system", "content": "Be brief."}
REPLY = "It is Paris."  # what full training teaches every family to answer, and to end there
needs_llama_cpp = pytest.mark.skipif(not (has_converters() and has_llama_cpp()),
                                     reason="llama.cpp and its GGUF converters are not installed (make setup-fast)")
STEPS = 100  # enough for each tiny model to learn REPLY and its end-of-turn token, with a margin (80 sufficed)


@dataclass
class Built:
    tiny: Tiny
    path: Path  # the saved model directory, a model "name"
    tokenizer: object
    data: Path  # chat records whose reply is always REPLY (with a system message where the template takes one)
    records: list[dict]


def convention(tiny: Tiny):
    return CONVENTIONS[tiny.convention or FAMILIES[tiny.family].convention]


@pytest.fixture(scope="session", params=list(TINY))
def built(request, bpe, tmp_path_factory) -> Built:
    tiny = TINY[request.param]
    if tiny.chat_template is None:
        pytest.skip(f"tests/templates/{tiny.template} (the {tiny.name} chat template) is not in the tree yet")
    root = tmp_path_factory.mktemp(tiny.name)
    system = [SYSTEM] if tiny.system else []
    records = [{"messages": system + [{"role": "user", "content": f"What is {i}+{i}?"},
                                      {"role": "assistant", "content": REPLY}]} for i in range(1, 5)]
    return Built(tiny, build(tiny, bpe, root / "model"), tokenizer_for(tiny, bpe),
                 write_jsonl(root / "chat.jsonl", records), records)


def settings(built: Built, output_dir: Path, method: dict, steps: int) -> dict:
    """A short run with no evaluation, like tests/test_train.py's; max_length fits SmolLM3's default system prompt
    (over 900 tiny-BPE tokens) whole."""
    return {"model": str(built.path), "data": {"train": str(built.data), "eval_fraction": 0},
            "output_dir": str(output_dir), "method": method, "max_steps": steps, "batch_size": 4,
            "learning_rate": 1e-2, "warmup_ratio": 0, "logging_steps": 1, "save_steps": 1000,
            "evaluate_before": False, "max_length": 1024}


def one_thread_train(cfg: dict):
    """`run_train` on one intra-op thread, as conftest's `_threads` gives each test: a session fixture is set up
    before it, and a tiny model's matmuls cost less than handing them to several threads (100 steps: 1 s on one
    thread, 28 s on a loaded 2-core machine's default)."""
    default = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_train(cfg)
    finally:
        torch.set_num_threads(default)


@pytest.fixture(scope="session")
def lora_run(built, tmp_path_factory):
    return one_thread_train(settings(built, tmp_path_factory.mktemp("lora") / "run", {"name": "lora", "r": 4}, 3))


@pytest.fixture(scope="session")
def full_run(built, tmp_path_factory):
    return one_thread_train(settings(built, tmp_path_factory.mktemp("full") / "run", {"name": "full"}, STEPS))


# ---------------------------------------------------------------------------------------------------------
# the family table
# ---------------------------------------------------------------------------------------------------------

def test_the_family_table_knows_the_saved_model(built):
    from transformers import AutoConfig, GenerationConfig

    family = FAMILIES[built.tiny.family]
    config = json.loads((built.path / "config.json").read_text())
    assert family_of(AutoConfig.from_pretrained(built.path)) is family
    assert family_of(config) is family and family_of(config["model_type"]) is family
    assert convention_of(built.tokenizer.chat_template, family) is convention(built.tiny)
    # The table's end-of-turn token is one the model's generation config stops on.
    stops = GenerationConfig.from_pretrained(built.path).eos_token_id
    stops = built.tokenizer.convert_ids_to_tokens(stops if isinstance(stops, list) else [stops])
    assert set(convention(built.tiny).stops) <= set(stops)


def test_an_unknown_architecture_is_a_sentence_that_names_the_known_ones():
    with pytest.raises(UnknownFamilyError, match=r"no model family for model_type 'falcon'; the families it knows "
                                                 r"are llama \(llama\); qwen2 \(qwen2\); .* gemma \(gemma, gemma2, "
                                                 r"gemma3_text\); .*tunesmith/families.py"):
        family_of({"model_type": "falcon"})
    with pytest.raises(UnknownFamilyError, match="model_type None"):
        family_of(object())


def test_conventions_are_recognised_from_the_template_text():
    from conftest import SMOLLM2_TEMPLATE

    from tunesmith.data.templates import CHAT_TEMPLATES

    assert convention_of(SMOLLM2_TEMPLATE, FAMILIES["llama"]).name == "chatml"  # a llama with ChatML turns
    assert convention_of(CHAT_TEMPLATES["llama3"]).name == "llama3"
    assert convention_of(CHAT_TEMPLATES["plain"], FAMILIES["llama"]) is None  # a layout the table does not know
    assert convention_of(None, FAMILIES["gemma"]).name == "gemma" and convention_of(None) is None


def test_parameter_lines_and_the_date_of_a_dated_template():
    assert CONVENTIONS["phi3"].parameter_lines() == ['PARAMETER stop "<|end|>"', 'PARAMETER stop "<|system|>"',
                                                     'PARAMETER stop "<|user|>"', 'PARAMETER stop "<|assistant|>"']
    assert CONVENTIONS["mistral"].parameter_lines() == ['PARAMETER stop "</s>"', 'PARAMETER stop "[INST]"']
    dated = CONVENTIONS["llama3.2"].modelfile_template(dt.date(2025, 3, 7))
    assert "Today Date: 07 Mar 2025\n" in dated and TODAY not in dated
    assert CONVENTIONS["llama3.1"].modelfile_template() == CONVENTIONS["llama3.1"].ollama  # a fixed date
    # A Modelfile quotes TEMPLATE in triple quotes, so no template may hold them.
    assert not [c.name for c in CONVENTIONS.values() if '"""' in c.ollama]


# ---------------------------------------------------------------------------------------------------------
# data: preview and loss masks
# ---------------------------------------------------------------------------------------------------------

REPLIES = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def said(tiny: Tiny, replies: list[str]) -> list[str]:
    """Each of a conversation's replies as the model says it: with what the template prints before it (Mistral's
    space; Qwen3's empty thinking before the last)."""
    return [tiny.reply_prefix + (tiny.last_reply_prefix if i == len(replies) - 1 else "") + reply
            for i, reply in enumerate(replies)]


def answer(tiny: Tiny) -> str:
    """REPLY as eval and the server give it back: without Qwen3's empty thinking, which they split off."""
    return tiny.reply_prefix + REPLY


def learned_texts(tiny: Tiny) -> list[str]:
    """Each reply as the model learns to say it, up to and including the family's end-of-turn token."""
    return [text + convention(tiny).stops[0] for text in said(tiny, REPLIES)]


def test_preview_marks_exactly_each_reply_and_its_end_of_turn(built, tmp_path, capsys):
    from tunesmith.cli import main
    from tunesmith.data.templates import render_chat

    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    assert main(["data", "preview", str(source), "--model", str(built.path), "--no-color"]) == 0
    marked = render_chat(built.tokenizer, CONVERSATION)
    for learned in learned_texts(built.tiny):
        assert marked.count(learned) == 1
        marked = marked.replace(learned, f"⟦{learned}⟧")
    out = capsys.readouterr().out
    assert marked in out and out.count("⟦") == 2


@pytest.mark.parametrize("with_generation_config", [True, False], ids=["generation-config", "template-only"])
def test_loss_mask_labels_exactly_each_reply_and_its_end_of_turn(built, with_generation_config):
    from tunesmith.models import load_generation_config

    tok, tiny = built.tokenizer, built.tiny
    config = load_generation_config(str(built.path)) if with_generation_config else None
    example = tokenize_chat(tok, CONVERSATION, generation_config=config)
    learned = learned_texts(tiny)
    assert learnable_spans(example) == [span_after(example.text, "", text) for text in learned]
    stop = tok.convert_tokens_to_ids(convention(tiny).stops[0])
    assert learned_ids(example) == [t for text in said(tiny, REPLIES) for t in ids(tok, text) + [stop]]
    # What a served model is prompted with is the training text up to each reply, token for token.
    starts = [t for t, label in enumerate(example.labels)
              if label != IGNORE_INDEX and (t == 0 or example.labels[t - 1] == IGNORE_INDEX)]
    turns = [k for k, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    for k, start in zip(turns, starts, strict=True):
        assert encode_chat_prompt(tok, CONVERSATION[:k]) == example.input_ids[:start]


# ---------------------------------------------------------------------------------------------------------
# train, eval, serve, export --merge
# ---------------------------------------------------------------------------------------------------------

def test_lora_trains_exactly_its_adapters(lora_run):
    run, trainer = lora_run
    params = dict(trainer.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and trainable == {n for n in params if re.search(LORA_TRAINABLE, n)}
    for name, p in params.items():
        assert (not torch.equal(p.detach(), trainer.initial[name])) == p.requires_grad, name
    assert {"adapter_model.safetensors", "adapter_config.json", "run.json"} <= {p.name for p in run.path.iterdir()}


def test_full_training_moves_every_weight(full_run):
    _, trainer = full_run
    still = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach(), trainer.initial[n])]
    assert all(p.requires_grad for p in trainer.model.parameters()) and still == []


def test_eval_scores_the_reply_full_training_taught(full_run, built, tmp_path):
    from tunesmith.evaluation import evaluate

    run, _ = full_run
    result = evaluate(str(run.path), str(built.data), output_dir=tmp_path)
    assert [p["prediction"] for p in result.predictions] == [answer(built.tiny)] * len(built.records)
    assert result.metrics["exact_match"] == 1.0 and (tmp_path / "predictions.jsonl").is_file()


def test_the_torch_server_answers_and_stops_at_the_family_end_of_turn(full_run, lora_run, built):
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app, load_engine

    engine = load_engine(str(built.path), {"full": str(full_run[0].path), "lora": str(lora_run[0].path)})
    body = {"messages": built.records[0]["messages"][:-1], "max_tokens": 16, "temperature": 0}
    try:
        with TestClient(create_app(engine, ServeSettings())) as client:
            full = client.post("/v1/chat/completions", json={"model": "full", **body}).json()["choices"][0]
            streamed = client.post("/v1/chat/completions", json={"model": "full", "stream": True, **body}).text
            lora = client.post("/v1/chat/completions", json={"model": "lora", **body})
    finally:
        engine.stop()
    # The reply ends where training taught it to, at the end-of-turn token (Gemma's is not its EOS), well
    # before max_tokens; the token itself is not part of the text.
    assert full["message"]["content"] == answer(built.tiny) and full["finish_reason"] == "stop"
    chunks = [json.loads(line[len("data: "):]) for line in streamed.split("\n\n") if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == full["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert lora.status_code == 200 and lora.json()["choices"][0]["finish_reason"] in ("stop", "length")


# What both servers are asked: the training prompt (whose reply was learned), a multi-turn conversation, a question
# the run never saw, and that question with the family's stop tokens banned, so the reply goes on past what training
# taught for all of max_tokens: the tiny model's own untrained continuation, the sensitive comparison.
ASKED = ("trained", "conversation", "unseen", "past the end")


def asked(built: Built) -> list[dict]:
    """The request bodies of ASKED (greedy, 16 tokens at most)."""
    system = [SYSTEM] if built.tiny.system else []
    unseen = system + [{"role": "user", "content": "Where is the cat?"}]
    banned = {str(built.tokenizer.convert_tokens_to_ids(t)): -100 for t in built.tiny.stops}
    return [{"messages": messages, "max_tokens": 16, "temperature": 0} for messages in
            (built.records[0]["messages"][:-1], system + CONVERSATION[:3], unseen)] + \
        [{"messages": unseen, "max_tokens": 16, "temperature": 0, "logit_bias": banned}]


def served_replies(engine, model: str, bodies: list[dict]) -> list[tuple]:
    """(message, finish_reason) of the chat reply to each body by `engine`'s server, its engine stopped after."""
    from starlette.testclient import TestClient

    from tunesmith.serve import ServeSettings, create_app

    try:
        with TestClient(create_app(engine, ServeSettings())) as client:
            replies = [client.post("/v1/chat/completions", json={"model": model, **body}).json() for body in bodies]
    finally:
        engine.stop()
    return [(r["choices"][0]["message"], r["choices"][0]["finish_reason"]) for r in replies]


@pytest.fixture(scope="session")
def gguf_replies(full_run, built, tmp_path_factory):
    """The full run's replies to ASKED from the llama-cpp backend as `tunesmith serve --backend llama-cpp
    --gguf-quant f16` serves it: from the run-to-GGUF cache, on one llama.cpp thread as tests/test_backends.py runs
    it. The cache entry is written here by `export_gguf` without its verification (tests/test_gguf_families.py
    verifies every family's exports; here llama.cpp's would cost up to 10 s a family), so the server finds it."""
    from tunesmith.export import export_gguf
    from tunesmith.export.cache import run_key
    from tunesmith.serve.backends import load_gguf_engine

    run, cache = full_run[0].path, tmp_path_factory.mktemp("gguf-cache")
    export_gguf(run, cache / "gguf" / run_key(run, "f16") / "model.gguf", quant="f16", verify=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNESMITH_CACHE", str(cache))
        engine = load_gguf_engine(str(run), gguf_quant="f16", threads=1)
    return served_replies(engine, str(run), asked(built))


@needs_llama_cpp
def test_the_llama_cpp_server_answers_as_the_torch_server_does(full_run, built, gguf_replies):
    """The run's f16 GGUF served by llama.cpp gives the torch backend's greedy reply to each question, token for
    token, and stops where it stops: at the family's end-of-turn token, which the GGUF's vocabulary and the run's
    generation config name (for the trained question, the reply training taught)."""
    from tunesmith.serve import load_engine

    model = str(full_run[0].path)
    torch_replies = served_replies(load_engine(model), model, asked(built))
    assert dict(zip(ASKED, gguf_replies, strict=True)) == dict(zip(ASKED, torch_replies, strict=True))
    assert torch_replies[0] == ({"role": "assistant", "content": answer(built.tiny)}, "stop")
    assert torch_replies[-1][1] == "length"


def test_a_phi3_gguf_is_named_so_llama_cpp_strips_as_its_tokenizer_does(bpe):
    """llama.cpp makes Phi-3's control tokens strip the whitespace to their right only in a file whose general.name
    says phi3: a Phi-3 run over a base directory named otherwise is named for it (without, the families' phi3 run,
    over a base called "model", was refused by the llama-cpp server's verification: other ids after <|user|>)."""
    from types import SimpleNamespace

    from tunesmith.export.gguf import converted_name

    phi3, qwen = tokenizer_for(TINY["phi3"], bpe), tokenizer_for(TINY["qwen2"], bpe)
    config = SimpleNamespace(model_type="phi3")
    assert converted_name("run", "/tmp/model", config, phi3) == "run (model) [phi3]"
    assert converted_name("run", "microsoft/Phi-3-mini-4k-instruct", config, phi3) == "run (Phi-3-mini-4k-instruct)"
    # Phi-4 is a phi3 model whose tokens do not strip; another family is never renamed.
    assert converted_name("run", "/tmp/model", config, qwen) == "run (model)"
    assert converted_name("run", "/tmp/model", SimpleNamespace(model_type="qwen2"), phi3) == "run (model)"


def test_export_merge_writes_a_standalone_model_of_the_family_with_the_runs_outputs(lora_run, built, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export import export
    from tunesmith.models import load_run

    run, _ = lora_run
    out = export(run.path, tmp_path / "merged", merge=True)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert family_of(merged.config) is FAMILIES[built.tiny.family]
    assert AutoTokenizer.from_pretrained(out).chat_template == built.tokenizer.chat_template
    prompt = encode_chat_prompt(built.tokenizer, built.records[0]["messages"][:-1])
    adapted, _, _ = load_run(run.path)
    assert torch.allclose(logits(merged, prompt), logits(adapted, prompt), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the Ollama Modelfile
# ---------------------------------------------------------------------------------------------------------

class FrozenClock(dt.datetime):
    """transformers' `strftime_now` reads the clock through its module's `datetime`: pinned here to a date that
    is nobody's default (Llama 3.1 prints 26 Jul 2024 unless told otherwise)."""

    @classmethod
    def now(cls, tz=None):
        return cls(2025, 3, 7, 12, 0)


def test_the_modelfile_template_writes_what_the_chat_template_writes(built, monkeypatch):
    import transformers.utils.chat_template_utils as chat_templates

    monkeypatch.setattr(chat_templates, "datetime", FrozenClock)
    tok, tiny = built.tokenizer, built.tiny
    messages = ([SYSTEM] if tiny.system else []) + CONVERSATION[:3]
    family_convention = convention(tiny)
    template = family_convention.modelfile_template(FrozenClock.now().date())
    # With reasoning left to the template, and turned off (Hugging Face `enable_thinking`, Ollama `think`).
    for think in (None, False) if family_convention.thinks else (None,):
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           **({} if think is None else {"enable_thinking": think}))
        # llama.cpp adds the BOS token itself (the GGUF's add_bos_token), so Ollama's templates leave it out.
        expected = expected.removeprefix(tok.bos_token or "\0")
        assert render(template, ollama_values(messages, think=think)) == expected

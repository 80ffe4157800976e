"""Tiny on-disk assets for the server tests: a base model directory and trained-looking runs (LoRA, IA3,
prompt tuning, a classifier), written the way `tunesmith.training` writes them (weights, tokenizer, run.json);
tool definitions and the checks of a call the tool-calling tests share."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

CONTEXT = 128  # small, so the context-window boundaries are cheap to reach

# Tool definitions for the tool-calling tests (tests/test_serve_tools.py, tests/test_backends.py).
WINDOW = 2048  # the convention's tool definitions take ~700 tokens of the tiny tokenizer
# Bounded arguments (short strings, enums, small integers, no extra keys), so a random model's call ends well
# within max_tokens.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


def tokenizer_from(bpe):
    from conftest import SMOLLM2_TEMPLATE
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe.__class__.from_str(bpe.to_str()), eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", chat_template=SMOLLM2_TEMPLATE)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _config(tokenizer, context: int = CONTEXT):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id)


def write_base(bpe, directory: Path, *, context: int = CONTEXT) -> Path:
    """The tiny Llama and its ChatML tokenizer; `context` positions (tool definitions need more than CONTEXT)."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = tokenizer_from(bpe)
    torch.manual_seed(0)
    LlamaForCausalLM(_config(tokenizer, context)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_run(base: Path, directory: Path, method: str, *, fingerprint: str | None = "auto") -> Path:
    """A peft run of `method` (lora, ia3, prompt_tuning, prefix_tuning) with non-trivial weights, plus run.json."""
    import torch
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.templates import chat_template_for, template_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = {"lora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
              "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"], init_ia3_weights=False),
              "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
              "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)}[method]()
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config)
    if method == "ia3":  # IA3 starts as the identity; scale it so the run really differs from the base
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "ia3_l" in name:
                    p.mul_(3.0)
    peft_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if fingerprint == "auto":
        fingerprint = template_fingerprint(chat_template_for(tokenizer))
    info = {"task": "sft", "base_model": str(base), "method": method, "peft": True, "labels": None,
            "chat_template_fingerprint": fingerprint}
    (directory / "run.json").write_text(json.dumps(info))
    return directory


def write_classifier(base: Path, directory: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(base)
    config = _config(tokenizer)
    config.num_labels, config.id2label, config.label2id = 2, {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    torch.manual_seed(2)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "run.json").write_text(json.dumps({"task": "classify", "base_model": str(base), "method": "full",
                                                    "peft": False, "labels": ["neg", "pos"],
                                                    "chat_template_fingerprint": None}))
    return directory


@contextmanager
def uvicorn_on_loopback(app):
    """Base URL (http://127.0.0.1:PORT) of a real uvicorn server for `app` on a free loopback port, for the
    tests where the transport matters (hang-ups, concurrent clients, lm-evaluation-harness over HTTP)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def check_three_turn_conversation(client, url: str, key: str) -> None:
    """Three chat turns in one server-side conversation (adapter "mine"): the store keeps each user turn in order."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    cid = httpx.post(f"{url}/v1/conversations", json={"system": "Be brief."}, headers=headers).json()["id"]
    for question in ["Hello", "What is 2+2?", "Thanks"]:
        client.chat.completions.create(model="mine", messages=[{"role": "user", "content": question}], max_tokens=5,
                                       temperature=0, extra_body={"conversation": cid})
    messages = httpx.get(f"{url}/v1/conversations/{cid}/messages", headers=headers).json()["data"]
    assert [m["content"] for m in messages[::2]] == ["Hello", "What is 2+2?", "Thanks"]


def check_call(call, names=tuple(SCHEMAS)) -> dict:
    """The call's arguments, after checking its shape: id, type, a known name, arguments that validate."""
    assert call.id.startswith("call_") and len(call.id) > 10 and call.type == "function"
    import jsonschema

    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def streamed_calls(chunks) -> tuple[str, list[dict], str]:
    """(content, calls, finish_reason) put together from stream chunks as OpenAI's clients do, checking that
    each call's first chunk carries index, id, type and name with empty arguments."""
    content, calls, finish = "", [], None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for part in choice.delta.tool_calls or []:
                if part.id is not None:
                    assert part.index == len(calls) and part.type == "function" and part.function.arguments == ""
                    calls.append({"id": part.id, "name": part.function.name, "arguments": ""})
                else:
                    calls[part.index]["arguments"] += part.function.arguments
            finish = choice.finish_reason or finish
    return content, calls, finish


def gate(monkeypatch, owner, name: str):
    """(entered, opened): every call of `owner.name` waits until `opened` is set; `entered` says one has begun."""
    import threading

    entered, opened = threading.Event(), threading.Event()
    original = getattr(owner, name)

    def gated(*args, **kwargs):
        entered.set()
        assert opened.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, gated)
    return entered, opened

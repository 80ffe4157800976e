"""GPU smoke check: train a few LoRA steps with an eval split (before/after scoring included), evaluate the
run, and serve one chat request, all with the model on the GPU. Runs on the CPU too (then it only checks the
code paths). A tiny random Llama with a BPE tokenizer trained on the demo data keeps it offline and quick.

    python benchmarks/gpu_smoke.py            # cuda when available, else cpu

Prints one line per phase and `gpu smoke: ok` at the end; any failure is a traceback and a non-zero exit."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "support-chat"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_model(directory: Path, records: list[dict]) -> Path:
    """A 4-layer random Llama and a BPE tokenizer (ChatML, EOS <|im_end|>) trained on the records' text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([m["content"] for r in records for m in r["messages"]], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>", chat_template=CHATML)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> int:
    import transformers

    from tunesmith import evaluate
    from tunesmith.training import train
    from tunesmith.models import load

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'no GPU'}); torch "
          f"{torch.__version__}, transformers {transformers.__version__}", flush=True)
    records = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()[:96]]
    test = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()[:8]]
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    base = tiny_model(work / "base", records)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    started = time.perf_counter()
    run = train({"model": str(base), "data": {"train": str(work / "train.jsonl"), "eval_fraction": 0.1},
                 "method": {"name": "lora", "r": 8}, "output_dir": str(work / "run"), "max_steps": 8,
                 "batch_size": 8, "learning_rate": 2e-3, "eval_steps": 4, "save_steps": 4, "logging_steps": 2,
                 "eval_limit": 8, "eval_max_new_tokens": 8, "max_length": 256})
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    print(f"train: {time.perf_counter() - started:.1f}s, loss {run.metrics['train']['train_loss']:.3f}, before "
          f"loss {run.metrics['before']['loss']:.3f} -> after {run.metrics['after']['loss']:.3f}; "
          f"peak GPU memory {peak:.0f} MiB", flush=True)
    if device == "cuda":
        assert peak > 0, "training did not touch the GPU"

    model, tokenizer = load(str(run.path))
    model.to(device)
    result = evaluate((model, tokenizer), test)
    print(f"eval on {device}: exact_match {result.metrics['exact_match']:.3f}, loss {result.metrics['loss']:.3f}",
          flush=True)

    from fastapi.testclient import TestClient

    from tunesmith.serve import create_app, load_engine

    engine = load_engine(str(base), {"run": str(run.path)})
    for served in engine.models.values():
        served.module.to(device)
    with TestClient(create_app(engine)) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "run", "max_tokens": 8, "messages": [{"role": "user", "content": test[0]["messages"][-2]["content"]}]})
        constrained = client.post("/v1/chat/completions", json={
            "model": "run", "max_tokens": 8, "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": "Reply in JSON."}]})
    assert reply.status_code == 200, reply.text
    assert constrained.status_code == 200, constrained.text
    print(f"serve on {device}: 200, {reply.json()['usage']}; json_object 200: "
          f"{constrained.json()['choices'][0]['message']['content']!r}", flush=True)
    print("gpu smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

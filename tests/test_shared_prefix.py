"""A batch whose examples begin with the same tokens (a system prompt, tool definitions) trains as one row, the
prefix once: the same losses and gradients as the padded batch, on a plain model, with LoRA and under activation
recompute; the row's layout token by token; and the batches where sharing would be wrong or useless pad."""

from __future__ import annotations

import pytest
import torch

import test_train

from tunesmith.data.packing import (MIN_SHARED, PaddingCollator, SharedPrefixCollator, shared_prefix,
                                    shared_tokens)
from tunesmith.training.loss import labelled_only_loss

IGNORE = -100


def example(prefix: list[int], own: list[int], learn_from: int) -> dict:
    """prefix + own tokens; labels on own[learn_from:] only."""
    ids = prefix + own
    labels = [IGNORE] * (len(prefix) + learn_from) + own[learn_from:]
    return {"input_ids": ids, "labels": labels}


def batch_of(seed: int = 0, prefix_len: int = 40, owns=(7, 12, 5), vocab: int = 100) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(5, vocab, (prefix_len,), generator=g).tolist()
    return [example(prefix, torch.randint(5, vocab, (n,), generator=g).tolist(), learn_from=2) for n in owns]


def test_the_row_holds_the_prefix_once_then_each_example_at_its_own_positions():
    prefix = list(range(10, 10 + MIN_SHARED))
    a, b = example(prefix, [1, 2, 3], 1), example(prefix, [4, 5], 1)
    out = SharedPrefixCollator(pad_token_id=0)([a, b])
    n = MIN_SHARED
    assert out["input_ids"].tolist() == [prefix + [1, 2, 3, 4, 5]]
    assert out["labels"].tolist() == [[IGNORE] * n + [IGNORE, 2, 3] + [IGNORE, 5]]
    assert out["position_ids"].tolist() == [list(range(n)) + [n, n + 1, n + 2] + [n, n + 1]]
    mask = out["attention_mask"][0, 0]
    assert mask.shape == (n + 5, n + 5)
    first, second = n, n + 3  # where each example's own tokens start in the row
    assert mask[:n, :n].equal(torch.ones(n, n, dtype=torch.bool).tril())  # the prefix: causal
    assert not mask[:n, n:].any()  # the prefix never sees an example
    assert mask[first + 2].tolist() == [True] * n + [True, True, True] + [False, False]
    assert mask[second + 1].tolist() == [True] * n + [False, False, False] + [True, True]  # never example a


def test_sharing_stops_before_the_first_learnable_token_and_its_predecessor():
    prefix = list(range(10, 60))
    # the second example learns from the prefix's 46th token on: the shared part must end before token 45
    early = {"input_ids": prefix + [7], "labels": [IGNORE] * 45 + prefix[45:] + [7]}
    assert shared_prefix([example(prefix, [1, 2], 0), early]) == 44
    assert shared_prefix([example(prefix, [1, 2], 0), example(prefix, [3], 0)]) == 49  # one own token each
    assert shared_prefix([example(prefix, [1], 0), example([9] + prefix[1:], [1], 0)]) == 0


def test_too_little_shared_or_too_long_a_row_pads_instead():
    short = batch_of(prefix_len=MIN_SHARED - 1)
    assert SharedPrefixCollator(0)(short).keys() == {"input_ids", "labels", "attention_mask"}
    assert SharedPrefixCollator(0)(short)["input_ids"].shape == (3, MIN_SHARED - 1 + 12)
    long = batch_of(prefix_len=40)
    assert SharedPrefixCollator(0, max_row=40 + 7 + 12 + 5 - 1)(long)["input_ids"].shape[0] == 3
    assert SharedPrefixCollator(0, max_row=40 + 7 + 12 + 5)(long)["input_ids"].shape == (1, 40 + 7 + 12 + 5)
    assert SharedPrefixCollator(0)(long[:1])["input_ids"].shape == (1, 47)  # one example: nothing to share


def test_an_epoch_costs_the_prefix_once_per_batch():
    examples = batch_of(owns=(7, 12, 5, 3, 9))
    total = sum(len(e["input_ids"]) for e in examples)
    assert shared_tokens(examples, batch_size=2) == total - (5 - 3) * 40  # 3 batches: 40 tokens once each
    assert shared_tokens(examples, batch_size=1) == total
    assert shared_tokens(batch_of(prefix_len=MIN_SHARED - 1), batch_size=8) == sum(
        len(e["input_ids"]) for e in batch_of(prefix_len=MIN_SHARED - 1))


def loss_and_grads(model, inputs, labelled_only: bool):
    model.zero_grad()
    if labelled_only:
        loss, _ = labelled_only_loss(model, inputs)
    else:
        loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_llama(variant: str = "full"):
    """A tiny random Llama (vocabulary 100) in training mode: with LoRA (its B non-zero, so A gets gradients) for
    "lora", activation recompute for "recompute", plain otherwise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        for name, p in model.named_parameters():  # LoRA's B starts at zero: give it a value so A gets gradients
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    if variant == "recompute":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


@pytest.mark.parametrize("variant", ["plain", "labelled_only", "lora", "recompute"])
def test_a_shared_row_trains_exactly_as_the_padded_batch(variant):
    model = tiny_llama(variant)
    examples = batch_of(owns=(7, 12, 5, 9))
    padded, shared = PaddingCollator(0)(examples), SharedPrefixCollator(0)(examples)
    assert shared["input_ids"].shape == (1, 40 + 7 + 12 + 5 + 9)
    labelled = variant != "plain"
    loss_padded, grads_padded = loss_and_grads(model, padded, labelled)
    loss_shared, grads_shared = loss_and_grads(model, shared, labelled)
    assert loss_shared == pytest.approx(loss_padded, rel=1e-5)
    assert grads_padded.keys() == grads_shared.keys() and grads_padded
    for name in grads_padded:
        torch.testing.assert_close(grads_shared[name], grads_padded[name], rtol=1e-4, atol=1e-6, msg=name)


assets = test_train.assets  # the tiny models: a session fixture shared with test_train


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "full"}])
def test_a_training_run_sharing_prefixes_equals_one_padding(assets, tmp_path, method, monkeypatch):
    """Chat data whose every conversation starts with the same long system prompt: a run with share_prefix
    (the default) logs the same losses and ends with the same weights as one without; its batches were rows."""
    import json

    from safetensors.torch import load_file

    from test_train import config, write_jsonl
    from tunesmith.data import packing
    from tunesmith.training import train

    system = "You answer sums for the Northwind Cycles arithmetic desk, briefly and exactly. " * 4
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"What is {i}+{i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(12)])
    rows, real = [], packing.SharedPrefixCollator.__call__
    monkeypatch.setattr(packing.SharedPrefixCollator, "__call__",
                        lambda self, ex: rows.append(out := real(self, ex)) or out)
    runs = {}
    for share in (True, False):
        cfg = config(assets, tmp_path / str(share), method=method, share_prefix=share, batch_size=4,
                     precision="fp32")  # bf16 products of other shapes round differently: compare the math
        run = train({**cfg, "data": {"train": str(data), "eval_fraction": 0}})
        log = [json.loads(line) for line in (run.path / "log.jsonl").read_text().splitlines()]
        name = "adapter_model.safetensors" if method["name"] == "lora" else "model.safetensors"
        runs[share] = ([e["loss"] for e in log if "loss" in e], load_file(run.path / name))
    assert len(rows) == 3 and all(r["input_ids"].shape[0] == 1 for r in rows)  # the first run's 3 steps, shared
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-3, atol=1e-5, msg=key)

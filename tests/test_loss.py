"""The labelled-only LM loss equals the plain causal-LM loss, in value and in every gradient: padded batches,
packed rows, LoRA, with and without the Trainer's num_items_in_batch normalisation; and a Trainer run with it
reproduces a run without it."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama
import test_train
from tunesmith.training.loss import labelled_only_loss, labelled_positions

assets = test_train.assets  # the tiny models and data: a session fixture shared with test_train


def batch(vocab: int, seed: int = 0):
    """Two right-padded rows of different lengths; labels only on a reply span of each (-100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 6:12] = ids[0, 6:12]
    labels[1, 3:9] = ids[1, 3:9]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def both(model, inputs, items=None, chunk_rows=None):
    """(plain loss, its grads), (labelled-only loss, its grads) on the same model and inputs."""
    model.zero_grad()
    plain = model(**inputs, **({"num_items_in_batch": items} if items is not None else {})).loss
    plain.backward()
    g_plain = grads(model)
    model.zero_grad()
    ours, _ = labelled_only_loss(model, inputs, items, chunk_rows=chunk_rows)
    ours.backward()
    return (plain, g_plain), (ours, grads(model))


def assert_same(plain, ours):
    assert ours[0].item() == pytest.approx(plain[0].item(), rel=1e-5)
    assert plain[1].keys() == ours[1].keys() and plain[1]
    for name in plain[1]:
        torch.testing.assert_close(ours[1][name], plain[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_positions_are_those_whose_next_token_is_learnable():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 4, -100, -100, -100]])
    mask, targets = labelled_positions(labels)
    assert mask.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert targets.tolist() == [7, 8, 4]


@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("items", [None, 9])
def test_equal_to_the_plain_loss_and_gradients(chatml_tokenizer, items, chunk_rows):
    """chunk_rows 5: the 12 learnable positions go through the head and the loss as 5 + 5 + 2, each chunk's
    logits recomputed in the backward pass; the sum and every gradient are still the plain loss's."""
    model = build_tiny_llama(chatml_tokenizer)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].numel() // args[0].shape[-1]))
    plain, ours = both(model, batch(len(chatml_tokenizer)), torch.tensor(items) if items else None, chunk_rows)
    assert_same(plain, ours)
    head_calls = rows[1:]  # rows[0]: the plain loss's head, on all 2 x 12 positions
    assert rows[0] == 24 and head_calls == ([12, 12] if chunk_rows is None else [5, 5, 2, 2, 5, 5])  # backward: last chunk first


def test_equal_on_packed_rows(chatml_tokenizer):
    """Two examples in one row: positions restart, no attention mask, the second's first label is -100."""
    model = build_tiny_llama(chatml_tokenizer)
    ids = torch.randint(5, len(chatml_tokenizer), (1, 14), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[0, 4:7], labels[0, 11:14] = ids[0, 4:7], ids[0, 11:14]
    inputs = {"input_ids": ids, "position_ids": torch.tensor([list(range(7)) + list(range(7))]), "labels": labels}
    assert_same(*both(model, inputs))


def test_equal_through_a_lora_adapter(chatml_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_llama(chatml_tokenizer), LoraConfig(r=4, target_modules="all-linear",
                                                                          init_lora_weights=False))
    assert_same(*both(model, batch(len(chatml_tokenizer), seed=2)))
    assert_same(*both(model, batch(len(chatml_tokenizer), seed=2), chunk_rows=4))


def test_a_control_that_differs_is_caught(chatml_tokenizer):
    """The comparison can fail: dropping one learnable position changes the loss."""
    model = build_tiny_llama(chatml_tokenizer)
    inputs = batch(len(chatml_tokenizer))
    plain, _ = both(model, inputs)
    fewer = {**inputs, "labels": inputs["labels"].clone()}
    fewer["labels"][0, 11] = -100
    assert labelled_only_loss(model, fewer)[0].item() != pytest.approx(plain[0].item(), rel=1e-5)


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "full"}])
def test_a_training_run_with_it_equals_one_without(assets, tmp_path, method, monkeypatch):
    import json

    import tunesmith.training.loss as loss

    used, real = [], loss.labelled_only_loss
    monkeypatch.setattr(loss, "labelled_only_loss", lambda *a, **k: used.append(1) or real(*a, **k))

    from safetensors.torch import load_file

    from test_train import config
    from tunesmith.training import train

    runs = {}
    for flag in (True, False):
        cfg = config(assets, tmp_path / str(flag), method=method, grad_accum=2, batch_size=3)
        run = train(cfg, labelled_only=flag)
        log = [json.loads(line) for line in (run.path / "log.jsonl").read_text().splitlines()]
        name = "adapter_model.safetensors" if method["name"] == "lora" else "model.safetensors"
        runs[flag] = ([e["loss"] for e in log if "loss" in e], load_file(run.path / name))
    assert len(used) == 3 * 2  # every micro-batch of the first run (3 steps x 2 accumulated), none of the second
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-3, atol=1e-5, msg=key)

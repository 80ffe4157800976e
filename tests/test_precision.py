"""precision: bf16 keeps LoRA's frozen base linears in bfloat16 and nothing else: trainable weights, embeddings
and norms are untouched fp32, a small adapter update is not rounded away, the fp32 base comes back exactly before
the run is saved and scored, recomputed activations give the same loss and gradients, and a run trains like an
fp32 one."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

import test_train
import tunesmith.training.precision as precision
from conftest import build_tiny_llama
from test_train import config, run_train
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.generation import SamplingParams

assets = test_train.assets  # the tiny models and data: a session fixture shared with test_train


def lora_model(tokenizer, seed: int = 0):
    """A tiny Llama with a LoRA adapter on every linear layer, its B matrices non-zero (an adapter mid-training)."""
    return get_peft_model(build_tiny_llama(tokenizer, seed=seed),
                          LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def ids(tokenizer, n: int = 10):
    return torch.randint(5, len(tokenizer), (2, n), generator=torch.Generator().manual_seed(3))


def lowered_layers(model):
    return [m for m in model.modules() if isinstance(m, precision.Bf16FrozenLinear)]


def test_only_the_frozen_base_goes_bf16(chatml_tokenizer):
    model = lora_model(chatml_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = precision.lower_frozen_linears(model)
    # 2 layers x (q, k, v, o, gate, up, down), then the embedding and the LM head (not adapter targets)
    assert len(names) == 16 and len(lowered_layers(model)) == 15
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-2:] == ["model.embed_tokens", "lm_head"]
    assert type(model.get_input_embeddings()) is precision.Bf16FrozenEmbedding
    for name, p in model.named_parameters():
        if ".base_layer." in name or "embed_tokens" in name or "lm_head" in name:
            assert p.dtype == torch.bfloat16 and not p.requires_grad, name
            assert torch.equal(p, before[name].to(torch.bfloat16)), name
        else:  # adapters and norms: the same fp32 values
            assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    x = ids(chatml_tokenizer)
    hidden = model.get_input_embeddings()(x)
    assert hidden.dtype == torch.float32  # the residual stream stays fp32
    assert torch.equal(hidden, before["base_model.model.model.embed_tokens.weight"].to(torch.bfloat16).float()[x])
    assert model(input_ids=x).logits.dtype == torch.float32


def test_a_tied_head_is_lowered_and_restored_as_one_shared_matrix(chatml_tokenizer):
    def tied():
        return build_tiny_llama(chatml_tokenizer, tie_word_embeddings=True)

    model = get_peft_model(tied(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    inner = model.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    original = {k: v.clone() for k, v in model.state_dict().items()}
    names = precision.lower_frozen_linears(model)
    assert names[-2:] == ["model.embed_tokens", "lm_head"]
    assert inner.lm_head.weight is inner.model.embed_tokens.weight and inner.lm_head.weight.dtype == torch.bfloat16
    precision.restore_frozen_linears(model, names, tied())
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    assert type(inner.lm_head) is torch.nn.Linear and type(inner.model.embed_tokens) is torch.nn.Embedding
    for key, value in original.items():
        assert model.state_dict()[key].dtype == value.dtype and torch.equal(model.state_dict()[key], value), key


def test_a_small_adapter_update_is_not_rounded_away(chatml_tokenizer):
    """A lowered layer adds the adapter's term to the base's output in fp32: scaled down to ~1e-4 of the output
    (an early update), the term still arrives whole. In a model cast to bf16 as a whole, the sum is rounded to
    bf16 (a step of ~1/128 of the output), which swallows such an update: that is why only the products are bf16."""
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(4))
    errors = {}
    for kind in ("lowered", "all-bf16"):
        model = lora_model(chatml_tokenizer)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(1e-5)
        layer = model.base_model.model.model.layers[0].mlp.up_proj
        with torch.no_grad():
            term = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]  # fp32
        if kind == "lowered":
            precision.lower_frozen_linears(model)
            assert isinstance(layer.base_layer, precision.Bf16FrozenLinear)
            inputs = x
        else:
            model.base_model.model.to(torch.bfloat16)
            inputs = x.to(torch.bfloat16)
        with torch.no_grad():
            on = layer(inputs).float()
            with model.disable_adapter():
                off = layer(inputs).float()
        assert term.abs().mean() < 1e-3 * off.abs().mean()  # a small update, as promised
        errors[kind] = ((on - off) - term).abs().mean() / term.abs().mean()
    assert errors["lowered"] < 1e-3
    assert errors["all-bf16"] > 0.3  # the control: rounded to bf16, the update is mostly lost


def test_restore_brings_back_the_exact_fp32_base(chatml_tokenizer):
    model = lora_model(chatml_tokenizer)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    names = precision.lower_frozen_linears(model)
    precision.restore_frozen_linears(model, names, build_tiny_llama(chatml_tokenizer))  # the same seed: as loaded
    assert not lowered_layers(model)
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    for key, value in original.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key


def test_recomputed_activations_give_the_same_loss_and_gradients(chatml_tokenizer):
    x = ids(chatml_tokenizer, 16)
    results = []
    for recompute in (False, True):
        model = lora_model(chatml_tokenizer)
        precision.lower_frozen_linears(model)
        model.config.use_cache = False
        if recompute:
            precision.recompute_activations(model)
            assert model.is_gradient_checkpointing
        model.train()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert results[1][0] == results[0][0]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_auto_is_bf16_only_for_lora_on_native_hardware(monkeypatch):
    lora = load_config({"data": {"train": "x.jsonl"}}).method
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    assert precision.choose(lora, "cpu")[0] == "bf16"
    for method in ({"name": "lora", "dora": True}, {"name": "full"}, {"name": "ia3"}):
        cfg = load_config({"data": {"train": "x.jsonl"}, "method": method})
        assert precision.choose(cfg.method, "cpu")[0] == "fp32", method
    monkeypatch.setattr(precision, "bf16_native", lambda device: False)
    setting, why = precision.choose(lora, "cpu")
    assert setting == "fp32" and "no native bf16" in why


def test_recompute_is_chosen_when_the_activations_would_outweigh_the_weights_or_crowd_the_memory(monkeypatch):
    from transformers import LlamaConfig

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3)
    # 5*576 + 2*192 + 4*1536 = 9408 fp32 values per token and layer: 8 x 256 tokens x 30 layers
    assert precision.activation_bytes(smol, 8, 256) == 8 * 256 * 30 * 9408 * 4
    gb = 1024 ** 3
    monkeypatch.setattr(precision, "free_memory", lambda device: 20 * gb)
    on, why = precision.choose_recompute(smol, 8, 256, "cpu", weight_bytes=int(0.27 * gb))  # SmolLM2, bf16 base
    assert on and "2.2 GB" in why and "outweigh the model's weights (0.27 GB)" in why
    on, why = precision.choose_recompute(smol, 1, 256, "cpu", weight_bytes=int(0.54 * gb))  # 0.28 GB at batch 1
    assert not on and "small beside the model's weights" in why
    assert not precision.choose_recompute(smol, 1, 128, "cpu", weight_bytes=0)[0]  # 0.14 GB: not worth a pass
    monkeypatch.setattr(precision, "free_memory", lambda device: 6 * gb)
    on, why = precision.choose_recompute(smol, 8, 256, "cpu", weight_bytes=28 * gb)  # a large model, little RAM
    assert on and "over a quarter of the 6.0 GB free" in why
    monkeypatch.setattr(precision, "free_memory", lambda device: None)  # free memory unknown: the weights decide
    assert precision.choose_recompute(smol, 8, 256, "cpu", weight_bytes=int(0.27 * gb))[0] is True
    assert precision.choose_recompute(smol, 8, 256, "cpu", weight_bytes=28 * gb)[0] is False
    monkeypatch.setattr(precision, "activation_bytes", lambda *a: None)
    assert precision.choose_recompute(smol, 8, 256, "cpu")[0] is False


def test_bf16_on_a_method_that_trains_the_base_is_a_config_error():
    with pytest.raises(TunesmithError, match="precision: bf16"):
        load_config({"data": {"train": "x.jsonl"}, "method": {"name": "full"}, "precision": "bf16"})


def test_a_bf16_run_trains_like_fp32_and_is_saved_and_scored_with_the_fp32_base(assets, tmp_path):
    runs = {}
    for setting in ("fp32", "bf16"):
        cfg = config(assets, tmp_path / setting, method={"name": "lora", "r": 4}, precision=setting, max_steps=4,
                     learning_rate=5e-3, data={"train": str(assets.chat), "eval": str(assets.chat)},
                     eval_max_new_tokens=4)
        run, trainer = run_train(cfg)
        log = [json.loads(line) for line in (run.path / "log.jsonl").read_text().splitlines()]
        runs[setting] = (run, trainer, [e["loss"] for e in log if "loss" in e])
    run, trainer, losses = runs["bf16"]
    saved = yaml.safe_load((run.path / "train_config.yaml").read_text())
    assert saved["precision"] == "bf16" and saved["recompute"] is False  # a tiny model's activations fit
    assert not lowered_layers(trainer.model)  # the fp32 base is back before saving and scoring
    assert losses == pytest.approx(runs["fp32"][2], rel=2e-2)
    assert losses[-1] < losses[0]
    # The "after" scores are those of the saved run as a user loads it (fp32 base + adapter).
    from tunesmith.evaluation import evaluate

    again = evaluate(str(run.path), str(assets.chat), params=SamplingParams(max_new_tokens=4))
    assert again.metrics["loss"] == pytest.approx(run.metrics["after"]["loss"], rel=1e-6)


def test_lowering_a_model_mapped_from_its_file_keeps_every_value(chatml_tokenizer, tmp_path):
    """Loaded with from_pretrained, the weights are views into the mapped checkpoint and the converted fp32 pages
    are handed back to the kernel (madvise): every weight must still equal the file's value afterwards."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    build_tiny_llama(chatml_tokenizer).save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float32"),
                           LoraConfig(r=4, target_modules="all-linear"))
    assert precision._file_mappings()  # the checkpoint is mapped: the page-dropping path runs
    names = precision.lower_frozen_linears(model)
    assert names
    for name, p in model.get_base_model().named_parameters():
        key = name.replace(".base_layer", "")
        if key in on_disk:
            expected = on_disk[key].to(p.dtype)
            assert torch.equal(p, expected), name

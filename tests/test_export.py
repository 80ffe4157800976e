"""export: merged LoRA runs load in plain transformers and give the unmerged model's logits; unmerged adapters
load in plain peft onto the base their config names; what cannot be merged, or would overwrite, is refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOLLM2_TEMPLATE, _wrap, build_tiny_llama

from tunesmith.cli import main
from tunesmith.export import ExportError, export
from tunesmith.models import load_run
from tunesmith.training import train

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
CHAT = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(16)]
REVIEWS = [{"text": text, "label": label} for text, label in [
    ("great movie, loved it", "positive"), ("boring", "negative"), ("it was a movie", "neutral"),
    ("loved it, great", "positive"), ("boring and long", "negative"), ("a movie", "neutral")] * 4]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def lm_dir(workdir, bpe):
    """A tiny random Llama with the ChatML test tokenizer, saved as a plain transformers checkpoint."""
    tokenizer = _wrap(bpe, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=SMOLLM2_TEMPLATE)
    model = build_tiny_llama(tokenizer)
    path = workdir / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(workdir, bpe):
    """A tiny random BERT encoder (no head: classify gives it a fresh one)."""
    from transformers import BertConfig, BertModel

    tokenizer = _wrap(bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                 pad_token_id=tokenizer.pad_token_id))
    path = workdir / "tiny-bert"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_sft(workdir, lm_dir, method: dict, name: str, **extra):
    """A few steps at a high learning rate, so adapters move well away from their (identity) initialisation."""
    config = {"model": str(lm_dir), "data": {"train": write_jsonl(workdir / "chat.jsonl", CHAT), "eval_fraction": 0},
              "method": method, "output_dir": str(workdir / name), "max_steps": 4, "batch_size": 4,
              "learning_rate": 5e-2, "evaluate_before": False, "save_steps": 100, **extra}
    return train(config).path


@pytest.fixture(scope="module")
def lora_run(workdir, lm_dir):
    # Named by a relative path, which peft would write into adapter_config.json as it is: export must make
    # it one that loads from anywhere.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        return run_sft(workdir, lm_dir.relative_to(workdir), {"name": "lora", "r": 4}, "lora-run")


@pytest.fixture(scope="module")
def full_run(workdir, lm_dir):
    return run_sft(workdir, lm_dir, {"name": "full"}, "full-run", learning_rate=1e-3)


def lm_logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250]])  # (1, 8), all inside the 400-token vocabulary
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# ---------------------------------------------------------------------------------------------------------
# LoRA: merged and unmerged
# ---------------------------------------------------------------------------------------------------------

def test_merged_lora_loads_in_plain_transformers_with_the_unmerged_logits(lora_run, lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(lora_run, tmp_path / "merged", merge=True)

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not hasattr(merged, "peft_config")
    unmerged, _, _ = load_run(lora_run)
    base = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    expected = lm_logits(unmerged)
    assert (expected - lm_logits(base)).abs().max() > 1e-2  # the adapter is not a no-op
    torch.testing.assert_close(lm_logits(merged), expected, atol=1e-4, rtol=1e-4)

    files = {p.name for p in out.iterdir()}
    assert not files & ADAPTER_FILES and {"config.json", "model.safetensors"} <= files
    assert AutoTokenizer.from_pretrained(out).chat_template == SMOLLM2_TEMPLATE
    assert not list(tmp_path.glob(".merged-*"))  # the temporary directory is gone


def test_unmerged_lora_loads_in_plain_peft_onto_the_base_it_names(lora_run, lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export(lora_run, tmp_path / "adapter")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lm_dir)  # absolute, though the run was given a relative path
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    adapter = PeftModel.from_pretrained(base, out).eval()
    unmerged, _, _ = load_run(lora_run)
    torch.testing.assert_close(lm_logits(adapter), lm_logits(unmerged), atol=1e-5, rtol=1e-5)
    assert ADAPTER_FILES <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()


def test_merged_classifier_keeps_its_trained_head(workdir, bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run = train({"model": str(bert_dir), "task": "classify",
                 "data": {"train": write_jsonl(workdir / "reviews.jsonl", REVIEWS), "eval_fraction": 0},
                 "method": {"name": "lora", "r": 4}, "output_dir": str(workdir / "classify-run"), "max_steps": 4,
                 "batch_size": 8, "learning_rate": 5e-2, "evaluate_before": False, "save_steps": 100}).path

    out = export(run, tmp_path / "merged", merge=True)

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    unmerged, tokenizer, _ = load_run(run)
    batch = tokenizer(["great movie", "boring and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, got = unmerged(**batch).logits, merged(**batch).logits
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# full runs, unmergeable methods, existing output
# ---------------------------------------------------------------------------------------------------------

def test_full_run_exports_standalone(full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export(full_run, tmp_path / "full")

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    trained, _, _ = load_run(full_run)
    torch.testing.assert_close(lm_logits(model), lm_logits(trained), atol=1e-5, rtol=1e-5)
    assert not {p.name for p in out.iterdir()} & ADAPTER_FILES


def test_merging_a_full_run_is_refused(full_run, tmp_path):
    with pytest.raises(ExportError, match="full run: its weights are already standalone; export without --merge"):
        export(full_run, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("method", [{"name": "prefix", "num_virtual_tokens": 4},
                                    {"name": "prompt", "num_virtual_tokens": 4}])
def test_soft_prompts_cannot_be_merged(workdir, lm_dir, tmp_path, method):
    run = run_sft(workdir, lm_dir, method, f"{method['name']}-run", max_steps=1)
    with pytest.raises(ExportError, match=f"{method['name']} tuning learns virtual tokens, which cannot be merged"):
        export(run, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged").exists()
    assert ADAPTER_FILES <= {p.name for p in export(run, tmp_path / "adapter").iterdir()}


def test_existing_output_is_kept_without_force_and_replaced_with_it(lora_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")

    with pytest.raises(ExportError, match="already exists; pass --force to replace it"):
        export(lora_run, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

    export(lora_run, out, force=True)
    files = {p.name for p in out.iterdir()}
    assert "mine.txt" not in files and ADAPTER_FILES <= files


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

def test_cli_exit_codes(lora_run, full_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "-o", str(out), "--merge"]) == 0
    assert f"exported {lora_run} to {out} (adapter merged)" in capsys.readouterr().out

    assert main(["export", str(lora_run), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tunesmith: error: {out} already exists") and "Traceback" not in err

    assert main(["export", str(full_run), "-o", str(tmp_path / "full"), "--merge"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tunesmith: error: ") and "export without --merge" in err

    assert main(["export", str(tmp_path / "no-run"), "-o", str(tmp_path / "x")]) == 1
    assert "is not a finished tunesmith run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# the model card
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("merge", [False, True])
def test_export_writes_a_model_card_the_hub_parser_reads(lora_run, lm_dir, tmp_path, merge):
    from huggingface_hub import ModelCard

    from tunesmith import runs

    info = runs.open_run(lora_run)
    out = export(lora_run, tmp_path / "out", merge=merge)

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == info.base_model == str(lm_dir)
    assert card.data.library_name == ("transformers" if merge else "peft")
    assert card.data.tags == ["tunesmith", "lora", "sft"]
    sha = info.train_data["sha256"]
    assert card.data.to_dict()["tunesmith_data_sha256"] == {"train": sha}
    assert f"- train: `chat.jsonl`, 16 examples, sha256 `{sha}`" in card.text
    assert f"Chat template fingerprint: `{info.chat_template_fingerprint}`" in card.text
    assert "Model Card for Model ID" not in card.text  # peft's placeholder is replaced, not kept
    assert card.text.endswith("## Metrics (eval split)\n\nNot scored.\n")  # no eval split, nothing scored

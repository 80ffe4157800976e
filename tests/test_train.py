"""The training loop end to end on tiny random models: exactly the intended parameters train for every method,
a saved run reloads to the same outputs, classification and NER heads survive saving, the exact files a run
writes, resuming from the last complete checkpoint reproduces an uninterrupted run, and packing trains."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import tunesmith.training.loop
from conftest import build_tiny_llama
from tunesmith.data.templates import CHAT_TEMPLATES
from tunesmith.data.tokenize import encode_tagging
from tunesmith.models import load_run
from tunesmith.runs import COMPLETE
from tunesmith.training import RunError, train


# ---------------------------------------------------------------------------------------------------------
# tiny assets, saved once: a causal LM and a BERT encoder (model name in a config = their directory) + data
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assets:
    lm: Path  # 2-layer Llama, untied LM head, ChatML tokenizer
    bert: Path  # 2-layer BERT encoder without a head, same tokenizer
    chat: Path  # 16 chat records
    classify: Path  # 12 text/label records, 3 labels
    ner: Path  # 8 tokens/tags records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def assets(bpe, tmp_path_factory) -> Assets:
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("assets")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe.__class__.from_str(bpe.to_str()),
                                        eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATES["chatml"])
    llama = build_tiny_llama(tokenizer)
    assert not llama.config.tie_word_embeddings  # so freeze can show embeddings and LM head apart
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128,
                                pad_token_id=tokenizer.pad_token_id))
    for model, name in ((llama, "lm"), (bert, "bert")):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)

    chat = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(16)]
    reviews = [("great movie, loved it", "positive"), ("boring", "negative"), ("it was fine", "neutral"),
               ("How can I help you today?", "neutral"), ("loved it", "positive"), ("boring movie", "negative")] * 2
    sentences = [(["Paris", "is", "the", "capital", "of", "France"], ["B-LOC", "O", "O", "O", "O", "B-LOC"]),
                 (["Northwind", "ships", "to", "Paris"], ["B-ORG", "O", "O", "B-LOC"])] * 4
    return Assets(lm=root / "lm", bert=root / "bert", chat=write_jsonl(root / "chat.jsonl", chat),
                  classify=write_jsonl(root / "classify.jsonl", [{"text": t, "label": lab} for t, lab in reviews]),
                  ner=write_jsonl(root / "ner.jsonl", [{"tokens": w, "tags": t} for w, t in sentences]))


def config(assets: Assets, output_dir: Path, **overrides) -> dict:
    """A short sft run: 3 steps at a high learning rate (no warm-up, whose first step has rate 0) so every trained
    parameter visibly moves; no evaluation (no held-out split, no 'before' scoring) and no checkpoints unless
    asked."""
    return {"model": str(assets.lm), "data": {"train": str(assets.chat), "eval_fraction": 0},
            "output_dir": str(output_dir), "max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0,
            "logging_steps": 1, "save_steps": 100, "evaluate_before": False, **overrides}


class CtrlC(TrainerCallback):
    """Presses Ctrl-C at the end of optimizer step `step`, before that step's checkpoint is written."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def run_train(cfg: dict, *, resume: bool = False, callbacks=()):
    """`train(cfg)` that also hands back the Trainer it built: `trainer.model` is the in-memory trained model and
    `trainer.initial` its parameters as they were before the first step (after the method was applied).
    `callbacks` are added to the Trainer."""
    made = []

    def capturing(base):
        class Capturing(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters()}
                for callback in callbacks:
                    self.add_callback(callback)
                made.append(self)

        return Capturing

    loop = tunesmith.training.loop
    with pytest.MonkeyPatch.context() as patch:
        for name in ("RunTrainer", "PreferenceTrainer"):  # whichever the task trains with
            patch.setattr(loop, name, capturing(getattr(loop, name)))
        run = train(cfg, resume=resume)
    return run, made[-1]


def logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits


def against_checkpoint(model, directory: Path) -> tuple[dict[str, tuple], set[str]]:
    """({checkpoint key: (parameter now, value in the checkpoint)}, all checkpoint keys) for the base weights of
    `model`, matched by name: peft keeps an adapted layer's weight as `<layer>.base_layer.weight`, and an encoder
    saved without a head has no `bert.` prefix."""
    checkpoint = load_file(directory / "model.safetensors")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    pairs = {}
    for name, p in inner.named_parameters():
        name = name.replace(".base_layer", "")
        key = name if name in checkpoint else name.removeprefix(inner.base_model_prefix + ".")
        if key in checkpoint:
            pairs[key] = (p, checkpoint[key])
    return pairs, set(checkpoint)


# ---------------------------------------------------------------------------------------------------------
# 1-2. every method on a causal LM: exactly the intended parameters move, and the saved run reproduces them
# ---------------------------------------------------------------------------------------------------------

PROMPT_TEXT = "What is the capital of France?"  # 7 tokens in the tiny vocabulary
LORA_TRAINABLE = r"\.lora_[AB]\.default\.weight$"
METHODS = {
    # name: (method config, regex that exactly the trainable parameter names match)
    "full": ({"name": "full"}, r""),  # everything
    "freeze": ({"name": "freeze", "train_layers": 1, "train_head": False}, r"^model\.(layers\.1\.|norm\.)"),
    "freeze+head": ({"name": "freeze", "train_layers": 1}, r"^(model\.layers\.1\.|model\.norm\.|lm_head\.)"),
    "lora": ({"name": "lora", "r": 4}, LORA_TRAINABLE),
    "lora+dora": ({"name": "lora", "r": 4, "dora": True},
                  LORA_TRAINABLE + r"|\.lora_magnitude_vector\.default\.weight$"),
    "lora+rslora": ({"name": "lora", "r": 4, "rslora": True}, LORA_TRAINABLE),
    # Over 6 steps (0-5): 0-1 warm-up at init_r, 2-4 budget shrinking (pruning), 5 final allocation at target_r.
    "adalora": ({"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1}, r"\.lora_[ABE]\.default$"),
    "ia3": ({"name": "ia3"}, r"\.ia3_l\.default$"),
    "prefix": ({"name": "prefix", "num_virtual_tokens": 4}, r"^prompt_encoder\.default\.embedding\.weight$"),
    "prompt": ({"name": "prompt", "num_virtual_tokens": 4}, r"^prompt_encoder\.default\.embedding\.weight$"),
    "prompt+init_text": ({"name": "prompt", "num_virtual_tokens": 7, "init_text": PROMPT_TEXT},
                         r"^prompt_encoder\.default\.embedding\.weight$"),
}


@pytest.fixture(scope="module")
def method_run(assets, tmp_path_factory):
    """Train each method once per module (two tests look at every run): name -> (run, trainer)."""
    done = {}

    def get(name: str):
        if name not in done:
            method, _ = METHODS[name]
            steps = 6 if name == "adalora" else 3
            done[name] = run_train(config(assets, tmp_path_factory.mktemp(name) / "run", method=method,
                                          max_steps=steps))
        return done[name]

    return get


@pytest.mark.parametrize("name", METHODS)
def test_exactly_the_intended_parameters_train(name, method_run, assets):
    _, trainer = method_run(name)
    model, pattern = trainer.model, METHODS[name][1]
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and trainable == {n for n in params if re.search(pattern, n)}
    for n, p in params.items():
        if name == "adalora" and ".lora_E." in n:
            continue  # starts at 0 and may be pruned back to all-0 (see the AdaLoRA test below)
        moved = not torch.equal(p.detach(), trainer.initial[n])
        assert moved == p.requires_grad, f"{n}: requires_grad={p.requires_grad} but moved={moved}"

    # Against the base checkpoint itself: every base weight is still there, bit-identical unless it trains.
    base, keys = against_checkpoint(model, assets.lm)
    assert base.keys() == keys
    for key, (p, saved) in base.items():
        assert torch.equal(p.detach(), saved) != p.requires_grad, key


def test_lora_adapts_every_linear_layer_of_the_blocks_but_not_the_lm_head(method_run):
    _, trainer = method_run("lora")
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in trainer.model.named_parameters()
               if ".lora_A." in n}
    assert adapted == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.mark.parametrize("name, scaling", [("lora", 16 / 4), ("lora+rslora", 16 / 4 ** 0.5)])
def test_lora_scales_by_alpha_over_r_and_rslora_by_alpha_over_sqrt_r(name, scaling, method_run):
    _, trainer = method_run(name)
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(scaling)


def test_prompt_init_text_starts_from_the_texts_embeddings(method_run, assets):
    from transformers import AutoTokenizer

    _, trainer = method_run("prompt+init_text")
    ids = AutoTokenizer.from_pretrained(assets.lm)(PROMPT_TEXT)["input_ids"]
    assert len(ids) == 7  # == num_virtual_tokens: no repeating or cutting of the text
    embeddings = load_file(assets.lm / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(trainer.initial["prompt_encoder.default.embedding.weight"], embeddings[ids])


def test_adalora_prunes_ranks_down_to_the_target_budget(method_run):
    run, trainer = method_run("adalora")
    pattern = trainer.model.peft_config["default"].rank_pattern
    assert len(pattern) == 14  # 7 linear layers x 2 blocks
    kept = {name: sum(mask) for name, mask in pattern.items()}
    assert sum(kept.values()) == 2 * len(kept)  # target_r on average
    assert len(set(kept.values())) > 1  # reallocated between layers, not cut evenly
    # Pruned singular values are exactly zero in the trained model, and the saved adapter is cut to the ranks.
    saved = load_file(run.path / "adapter_model.safetensors")
    for name, p in trainer.model.named_parameters():
        if ".lora_E." in name:
            key = name.removeprefix("base_model.model.").removesuffix(".default")
            mask = torch.tensor(pattern[key])
            assert torch.all(p.detach()[~mask] == 0) and torch.all(p.detach()[mask] != 0)
            assert saved[name.removesuffix(".default")].shape == (kept[key], 1)


@pytest.mark.parametrize("name", METHODS)
def test_saved_run_reloads_to_the_same_outputs(name, method_run, assets):
    run, trainer = method_run(name)
    model, tokenizer, info = load_run(run.path)
    assert info.method == METHODS[name][0]["name"] and info.task == "sft"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3+3?"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    trained = logits(trainer.model, ids)
    torch.testing.assert_close(logits(model, ids), trained, rtol=0, atol=1e-5)
    # ... and the trained model is not the base model (prompt tuning adds virtual positions in front).
    from transformers import AutoModelForCausalLM

    base = logits(AutoModelForCausalLM.from_pretrained(assets.lm), ids)
    assert (trained[:, -len(ids):] - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# 3. classification and NER: the fresh head trains, is saved, and reloads (PEFT issues 310, 577)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, method, head", [
    ("bert", "lora", "classifier"), ("bert", "full", "classifier"), ("lm", "lora", "score")])
def test_classifier_head_trains_saves_and_reloads(model, method, head, assets, tmp_path):
    run, trainer = run_train(config(assets, tmp_path / "run", model=str(getattr(assets, model)), task="classify",
                                    data={"train": str(assets.classify), "eval_fraction": 0},
                                    method={"name": method}, max_length=64))
    info = json.loads((run.path / "run.json").read_text())
    assert info["labels"] == ["negative", "neutral", "positive"]

    # The head's trainable weight: peft trains a copy (`modules_to_save`) and leaves the original alone.
    trained_head = f"base_model.model.{head}.modules_to_save.default.weight" if method == "lora" else f"{head}.weight"
    params = dict(trainer.model.named_parameters())
    assert params[trained_head].requires_grad
    assert not torch.equal(params[trained_head].detach(), trainer.initial[trained_head])
    if method == "lora":
        assert f"base_model.model.{head}.weight" in load_file(run.path / "adapter_model.safetensors")
        base, keys = against_checkpoint(trainer.model, getattr(assets, model))
        assert base.keys() == keys - {"lm_head.weight"}  # a classifier has no LM head
        for key, (p, saved) in base.items():
            assert not p.requires_grad and torch.equal(p.detach(), saved), key

    reloaded, tokenizer, _ = load_run(run.path)
    assert reloaded.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ids = tokenizer("great movie, loved it")["input_ids"]
    torch.testing.assert_close(logits(reloaded, ids), logits(trainer.model, ids), rtol=0, atol=1e-5)


def test_ner_head_trains_saves_and_reloads(assets, tmp_path):
    run, trainer = run_train(config(assets, tmp_path / "run", model=str(assets.bert), task="ner",
                                    data={"train": str(assets.ner), "eval_fraction": 0},
                                    method={"name": "lora"}, max_length=64))
    assert json.loads((run.path / "run.json").read_text())["labels"] == ["O", "B-LOC", "B-ORG"]
    params = dict(trainer.model.named_parameters())
    head = "base_model.model.classifier.modules_to_save.default.weight"
    assert params[head].requires_grad and not torch.equal(params[head].detach(), trainer.initial[head])
    # peft's "all-linear" would also put LoRA on the token classifier, and then fail to train it whole.
    assert not any("classifier" in n and "lora_" in n for n in params)
    base, keys = against_checkpoint(trainer.model, assets.bert)
    assert base.keys() == {k for k in keys if not k.startswith("pooler.")}  # token classifiers have no pooler
    assert all(not p.requires_grad and torch.equal(p.detach(), saved) for p, saved in base.values())
    reloaded, tokenizer, _ = load_run(run.path)
    ids = tokenizer("Northwind ships to Paris")["input_ids"]
    out = logits(reloaded, ids)
    assert out.shape == (1, len(ids), 3)
    torch.testing.assert_close(out, logits(trainer.model, ids), rtol=0, atol=1e-5)


def test_ner_labels_sit_on_the_first_sub_token_of_each_word(assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.bert)
    record = {"tokens": ["Northwind", "ships", "to", "Paris"], "tags": ["B-ORG", "O", "O", "B-LOC"]}
    [features] = encode_tagging(tokenizer, [record], {"O": 0, "B-LOC": 1, "B-ORG": 2}, max_length=64)
    # "Northwind" is 8 sub-tokens; " ships" starts with a token that is only the space, which belongs to no word.
    assert list(zip(tokenizer.convert_ids_to_tokens(features["input_ids"]), features["labels"])) == [
        ("N", 2), ("o", -100), ("r", -100), ("t", -100), ("h", -100), ("w", -100), ("in", -100), ("d", -100),
        ("Ġ", -100), ("s", 0), ("hi", -100), ("p", -100), ("s", -100),
        ("Ġt", 0), ("o", -100),
        ("ĠParis", 1)]


# ---------------------------------------------------------------------------------------------------------
# 4. what a finished run writes
# ---------------------------------------------------------------------------------------------------------

RUN_FILES = {"chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "train_config.yaml", "run.json",
             "log.jsonl", "metrics.json"}
# run.json's keys, in the order written (runs.RunInfo's fields)
RUN_INFO_KEYS = ["task", "base_model", "method", "peft", "labels", "chat_template_fingerprint", "defaults", "versions",
                 "data", "replay", "parent", "lineage", "regularization", "tools", "chat_template_kwargs", "reasoning"]


def test_adapter_run_writes_exactly_its_files(assets, tmp_path):
    from tunesmith.config import load_config

    cfg = config(assets, tmp_path / "run", method={"name": "lora", "r": 4}, max_steps=4, save_steps=2,
                 eval_steps=2, data={"train": str(assets.chat), "eval_fraction": 0.25}, evaluate_before=True,
                 eval_max_new_tokens=4)
    saved = []

    class Saves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # called after RunTrainer marked the checkpoint
            saved.append({p.name: (p / COMPLETE).is_file() for p in Path(args.output_dir).iterdir()})

    run, _ = run_train(cfg, callbacks=[Saves()])
    # Checkpoints were written and marked complete during training, then removed at the end.
    assert saved == [{"checkpoint-2": True}, {"checkpoint-2": True, "checkpoint-4": True}]
    assert {p.name for p in run.path.iterdir()} == RUN_FILES | {"adapter_config.json", "adapter_model.safetensors",
                                                                "predictions.jsonl"}

    log = [json.loads(line) for line in (run.path / "log.jsonl").read_text().splitlines()]
    losses = [e for e in log if "loss" in e]
    assert [e["step"] for e in losses] == [1, 2, 3, 4]
    assert all(e["loss"] > 0 and e["lr"] > 0 for e in losses)
    assert [e["step"] for e in log if "eval_loss" in e] == [2, 4]
    assert "train_loss" in log[-1] and log[-1]["step"] == 4

    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics.keys() == {"before", "after", "train"} and metrics == run.metrics
    scores = {"exact_match", "bleu", "rouge_l", "loss", "perplexity"}
    assert metrics["before"].keys() == scores | {"before_kind"} and metrics["after"].keys() == scores
    assert metrics["before"]["before_kind"] == "zero-shot"
    predictions = [json.loads(line) for line in (run.path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and predictions[0].keys() == {"input", "gold", "prediction", "correct"}
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert metrics["train"]["examples"] == 12 and metrics["train"]["learnable_tokens"] > 0
    assert 0 < metrics["train"]["trainable_parameters"] < metrics["train"]["total_parameters"]

    info = json.loads((run.path / "run.json").read_text())
    assert list(info) == RUN_INFO_KEYS
    assert info["base_model"] == str(assets.lm.resolve()) and info["peft"] and info["labels"] is None
    assert info["chat_template_fingerprint"] and info["tools"] is None  # no tools in its data
    assert (info["chat_template_kwargs"], info["reasoning"]) == (None, "auto")  # the data config's defaults
    # The resolved config: what the config left unset holds the values chosen (tests/test_defaults.py).
    from tunesmith.training.precision import bf16_native

    assert load_config(run.path / "train_config.yaml") == load_config(
        {**cfg, "epochs": 1.33, "precision": "bf16" if bf16_native("cpu") else "fp32", "recompute": False})


def test_full_run_writes_exactly_its_files(method_run):
    run, _ = method_run("full")
    assert {p.name for p in run.path.iterdir()} == RUN_FILES | {"config.json", "generation_config.json",
                                                                 "model.safetensors"}


# ---------------------------------------------------------------------------------------------------------
# 5. resume: continue from the last complete checkpoint and end where an uninterrupted run ends
# ---------------------------------------------------------------------------------------------------------

def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(run_dir / name)


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for line in (run_dir / "log.jsonl").read_text().splitlines()
            if "loss" in (e := json.loads(line))]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_reproduces_an_uninterrupted_run(method, assets, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = dict(method={"name": method}, max_steps=6, save_steps=2)
    run_a, _ = run_train(config(assets, a, **common))

    # Ctrl-C at the end of step 6, before its checkpoint: step 5 already ran (and was logged) after checkpoint-4.
    with pytest.raises(RunError, match=r"interrupted at step 6; continue from checkpoint-4 with --resume"):
        run_train(config(assets, b, **common), callbacks=[CtrlC(6)])
    assert not (b / "run.json").exists()
    assert [step for step, _ in logged_losses(b)] == [1, 2, 3, 4, 5]
    with pytest.raises(RunError, match="pass --resume"):  # a new run would clobber the unfinished one
        train(config(assets, b, **common))
    half_written = b / "checkpoints" / "checkpoint-99"  # e.g. killed while transformers wrote it: no marker
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"junk")

    run_b, _ = run_train(config(assets, b, **common), resume=True)
    # Every step's loss, logged once: the step-5 line from before the interrupt was dropped, then written again.
    steps_a, losses_a = zip(*logged_losses(a))
    steps_b, losses_b = zip(*logged_losses(b))
    assert steps_a == steps_b == (1, 2, 3, 4, 5, 6)
    assert losses_b == pytest.approx(losses_a, rel=0, abs=1e-5)
    assert run_b.metrics["train"]["train_loss"] == pytest.approx(run_a.metrics["train"]["train_loss"], abs=1e-5)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-5)
    assert not (b / "checkpoints").exists()


def test_resume_survives_a_half_written_log_line_and_a_truncated_before_score(assets, tmp_path, capsys):
    """A kill can cut log.jsonl mid-line or metrics_before.json mid-write: resume drops the partial line and
    scores "before" again, and the progress of each scoring phase is shown as plain lines (not a terminal)."""
    run_dir = tmp_path / "run"
    cfg = config(assets, run_dir, max_steps=4, save_steps=2, evaluate_before=True,
                 data={"train": str(assets.chat), "eval_fraction": 0.25}, eval_max_new_tokens=4)
    with pytest.raises(RunError, match="interrupted at step 4"):
        run_train(cfg, callbacks=[CtrlC(4)])
    before = json.loads((run_dir / "metrics_before.json").read_text())
    (run_dir / "metrics_before.json").write_text(json.dumps(before)[:20])
    with (run_dir / "log.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    capsys.readouterr()
    run, _ = run_train(cfg, resume=True)
    assert run.metrics["before"]["loss"] == pytest.approx(before["loss"])
    assert [step for step, _ in logged_losses(run_dir)] == [1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "before (base model): 4 held-out: generating 4/4" in err
    assert "after (trained): 4 held-out: loss 4/4" in err


def test_adalora_runs_refuse_to_resume(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", method={"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1,
                                                    "tfinal": 1}, max_steps=6, save_steps=2)
    with pytest.raises(RunError, match="interrupted at step 5; AdaLoRA runs cannot be resumed"):
        run_train(cfg, callbacks=[CtrlC(5)])
    with pytest.raises(RunError, match="AdaLoRA"):
        train(cfg, resume=True)


def test_resume_needs_a_complete_checkpoint(assets, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # no marker: not usable
    with pytest.raises(RunError, match="no complete checkpoint to resume from"):
        train(config(assets, run_dir), resume=True)
    (run_dir / "checkpoints" / "checkpoint-2" / COMPLETE).write_text("{}")
    with pytest.raises(RunError, match="pass --resume"):
        train(config(assets, run_dir))


def test_a_finished_run_is_never_overwritten(method_run, assets):
    run, _ = method_run("lora")
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}
    cfg = config(assets, run.path, method={"name": "lora", "r": 4})
    with pytest.raises(RunError, match="already holds a finished run"):
        train(cfg)
    with pytest.raises(RunError, match="no complete checkpoint"):
        train(cfg, resume=True)
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before


def test_a_directory_with_other_files_is_refused(assets, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="exists and is not empty"):
        train(config(assets, tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------------------------------------
# 6. packing
# ---------------------------------------------------------------------------------------------------------

def test_packed_sft_run_trains_and_writes_the_run(assets, tmp_path):
    run, trainer = run_train(config(assets, tmp_path / "run", method={"name": "lora", "r": 4}, packing=True,
                                    max_length=128, batch_size=2))
    rows = trainer.train_dataset
    assert len(rows) < 16 and sum(row["position_ids"].count(0) for row in rows) == 16  # 16 examples, fewer rows
    assert not trainer.model.config.use_cache  # a KV cache would turn per-example attention off
    assert [step for step, _ in logged_losses(run.path)] == [1, 2, 3]
    assert {p.name for p in run.path.iterdir()} == RUN_FILES | {"adapter_config.json", "adapter_model.safetensors"}


# ---------------------------------------------------------------------------------------------------------
# evaluation during training, held-out splits and the sft format switch
# ---------------------------------------------------------------------------------------------------------

def test_early_stopping_stops_after_patience_evaluations_without_improvement(assets, tmp_path):
    # learning_rate ~0: eval_macro_f1 never improves, so training stops after 1 + patience evaluations.
    run, trainer = run_train(config(assets, tmp_path / "run", model=str(assets.bert), task="classify",
                                    data={"train": str(assets.classify), "eval": str(assets.classify)},
                                    max_steps=30, eval_steps=1, learning_rate=1e-12,
                                    early_stopping={"metric": "eval_macro_f1", "patience": 2}))
    assert trainer.state.global_step == 3
    evals = [json.loads(line) for line in (run.path / "log.jsonl").read_text().splitlines()
             if "eval_macro_f1" in line]
    assert [e["step"] for e in evals] == [1, 2, 3]


def test_eval_fraction_is_a_seeded_split_of_train(assets):
    from tunesmith.config import load_config
    from tunesmith.training import load_splits

    cfg = load_config({"model": str(assets.lm), "data": {"train": str(assets.chat), "eval_fraction": 0.25}})
    train_a, eval_a = load_splits(cfg)
    train_b, eval_b = load_splits(cfg)
    assert (train_a, eval_a) == (train_b, eval_b) and len(eval_a) == 4 and len(train_a) == 12
    assert not [r for r in eval_a if r in train_a]
    _, eval_c = load_splits(load_config({"model": str(assets.lm), "seed": 1,
                                         "data": {"train": str(assets.chat), "eval_fraction": 0.25}}))
    assert eval_c != eval_a


def test_sft_format_converts_records_before_tokenizing(assets, tmp_path):
    from tunesmith.data.formats import read_records
    from tunesmith.config import load_config
    from tunesmith.training import sft_records

    records = read_records(assets.chat)
    cfg = load_config({"model": str(assets.lm), "data": {"train": str(assets.chat), "sft_format": "completion"}})
    assert sft_records(records, cfg)[0] == {"prompt": "What is 0+0?", "completion": "It is 0."}
    run = train(config(assets, tmp_path / "run", data={"train": str(assets.chat), "eval_fraction": 0,
                                                       "sft_format": "completion"}))
    assert (run.path / "run.json").exists()


def test_wrong_data_kind_for_the_task_is_a_sentence(assets, tmp_path):
    from tunesmith.config import ConfigError

    with pytest.raises(ConfigError, match=r"classify.jsonl: holds classification records, but task sft trains on "
                                          r"chat or completion data"):
        train(config(assets, tmp_path / "run", data={"train": str(assets.classify), "eval_fraction": 0}))


def test_the_trainer_is_imported_without_datasets_pandas_and_pyarrow():
    """transformers' Trainer imports `datasets` (pandas, pyarrow: ~80 MB resident) whenever it is installed;
    tunesmith's training process never needs it, yet `import datasets` must still work there afterwards."""
    import subprocess
    import sys

    pytest.importorskip("datasets")  # installed with the test extras (lm-eval): the case that matters
    code = ("import sys; import tunesmith.training; "
            "print(sorted({'datasets', 'pandas', 'pyarrow'} & set(sys.modules))); "
            "import datasets; print(datasets.Dataset.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "Dataset"]


def test_length_grouped_batches_hold_similar_lengths_in_a_random_order():
    from tunesmith.training.data import LengthGroupedSampler

    lengths = [int(x) for x in torch.randint(20, 200, (203,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=42)
    order = list(sampler)
    assert sorted(order) == list(range(203)) and len(sampler) == 203  # every example once per epoch
    batches = [order[i:i + 8] for i in range(0, 203, 8)]
    assert len(batches[-1]) == 3  # the partial batch comes last, so every batch boundary stays aligned

    def padding(batches):
        return sum(max(lengths[i] for i in b) - lengths[i] for b in batches for i in b)

    shuffled = [list(range(203))[i:i + 8] for i in range(0, 203, 8)]
    assert padding(batches) < padding(shuffled) / 4
    widest = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert widest != sorted(widest) and widest != sorted(widest, reverse=True)  # no length curriculum
    assert list(LengthGroupedSampler(lengths, 8, seed=42)) == order  # a resumed run replays the same epoch
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_a_run_trains_on_length_grouped_batches_unless_turned_off(assets, tmp_path, monkeypatch):
    """The batches the model sees: similar lengths with the default, the plain random sampler when off."""
    from tunesmith.training.callbacks import RunTrainer

    widths: dict[bool, list[int]] = {}
    for grouped in (True, False):
        seen = widths.setdefault(grouped, [])

        class Spy(RunTrainer):
            padding = seen  # this run's, bound now

            def training_step(self, model, inputs, *args, **kwargs):
                mask = inputs["attention_mask"]
                self.padding.append(int((mask.shape[1] * mask.shape[0]) - mask.sum()))  # padding in this batch
                return super().training_step(model, inputs, *args, **kwargs)

        monkeypatch.setattr(tunesmith.training.loop, "RunTrainer", Spy)
        run_train(config(assets, tmp_path / f"g{grouped}", max_steps=6, batch_size=4, group_by_length=grouped))
    assert len(widths[True]) == len(widths[False]) == 6
    assert sum(widths[True]) < sum(widths[False])


# ---------------------------------------------------------------------------------------------------------
# tool calling: a tools file trains with only model and data, and the run records how it rendered tools
# ---------------------------------------------------------------------------------------------------------

def tool_records(n: int) -> list[dict]:
    """Support conversations with tools: a call, its result and the answer; a conversation that ends with its
    call (scored before/after as a call); a plain reply where no call is due."""
    tools = [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order.",
                                               "parameters": {"type": "object",
                                                              "properties": {"order_id": {"type": "string"}}}}}]
    records = []
    for i in range(n):
        ask = {"role": "user", "content": f"Where is order {i}?"}
        call = {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": str(i)})}}]}
        shape = [[ask, call, {"role": "tool", "tool_call_id": f"call_{i}", "content": "shipped"},
                  {"role": "assistant", "content": f"Order {i} has shipped."}],
                 [ask, call],
                 [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "How can I help you today?"}]]
        records.append({"tools": tools, "messages": shape[i % 3]})
    return records


def test_a_tools_file_trains_with_only_model_and_data_and_the_run_records_how(assets, tmp_path):
    from tunesmith.data.templates import render_chat
    from tunesmith.models import load_tokenizer

    records = tool_records(18)
    path = write_jsonl(tmp_path / "tools.jsonl", records)
    run, _ = run_train({"model": str(assets.lm), "data": {"train": str(path)}, "output_dir": str(tmp_path / "run")})
    info = json.loads((run.path / "run.json").read_text())
    # The tiny model's ChatML template has no tool support: tunesmith's convention, calls in <tool_call> tags.
    assert info["tools"] == {"mode": "convention", "style": "hermes"}
    assert run.metrics["train"]["learnable_tokens"] > 0 and run.metrics["after"]
    saved, base = load_tokenizer(str(run.path)), load_tokenizer(str(assets.lm))
    for record in records[:3]:
        assert render_chat(saved, record["messages"], tools=record["tools"]) == \
            render_chat(base, record["messages"], tools=record["tools"])
    assert '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "0"}}\n</tool_call><|im_end|>' in \
        render_chat(saved, records[0]["messages"], tools=records[0]["tools"])


"""Defaults that adapt to the run (training/defaults.py): the exact values chosen for representative data and
model sizes, explicit values always winning, the concrete values saved with the run (a rerun from them trains
the same weights), and the best checkpoint by the eval metric being the one kept and the one the run ends with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

import test_train
import tunesmith.training.loop
from test_train import CtrlC, config, logged_losses, run_train, weights
from tunesmith.runs import RunError
from tunesmith.config import load_config
from tunesmith.training.defaults import CPU_SECONDS, Speed, best_checkpoint, choose
from tunesmith.training.precision import bf16_native

assets = test_train.assets  # the tiny models and data: a session fixture shared with test_train

MINILM = 22_715_141  # parameters of minilm-l6 with a 5-label classification head
SMOLLM2 = 134_515_008  # smollm2-135m-instruct
# The shipped demo tasks' sizes: examples, tokens, eval tokens (minilm-l6 / smollm2 tokenizers, max_length 512).
TICKETS = dict(examples=500, tokens=8267, eval_tokens=1650)
SUPPORT_CHAT = dict(examples=400, tokens=59465, eval_tokens=11900)
PRODUCT_TITLES = dict(examples=400, tokens=19540, eval_tokens=3900)


def chosen(raw: dict, **sizes):
    return choose(load_config({"data": {"train": "train.jsonl", "eval": "eval.jsonl"}, **raw}), **sizes)


# ---------------------------------------------------------------------------------------------------------
# the rules, on representative inputs
# ---------------------------------------------------------------------------------------------------------

CASES = {
    # name: (config, sizes, chosen values, total optimizer steps)
    # lora: 1e-3 at 135M x (135M / 22.7M)^0.25 = 1.6e-3 -> 2e-3, also what a fresh head needs (issue 10: 0.41
    # accuracy at 2e-4); 63 steps/epoch -> 3 epochs >= 150 steps.
    "classify lora": ({"model": "minilm-l6", "task": "classify"},
                      dict(**TICKETS, parameters=MINILM, fresh_head=True),
                      {"learning_rate": 2e-3, "epochs": 3.0, "warmup_ratio": 0.1, "eval_steps": 38, "save_steps": 38},
                      189),
    # full: 5e-5 at 135M, x sqrt(135M / 22.7M) = 1.2e-4 -> 1e-4.
    "classify full": ({"model": "minilm-l6", "task": "classify", "method": "full"},
                      dict(**TICKETS, parameters=MINILM, fresh_head=True),
                      {"learning_rate": 1e-4, "epochs": 3.0, "warmup_ratio": 0.1, "eval_steps": 38, "save_steps": 38},
                      189),
    # freeze: twice full; no head floor (the head trains with the top layers, at the full-model rate).
    "ner freeze": ({"model": "minilm-l6", "task": "ner", "method": "freeze"},
                   dict(examples=400, tokens=8010, eval_tokens=1600, parameters=22_569_226, fresh_head=True),
                   {"learning_rate": 2e-4, "epochs": 3.0, "warmup_ratio": 0.1, "eval_steps": 30, "save_steps": 30},
                   150),
    # 3 epochs wanted, but one epoch is 59k tokens x 134.5M parameters = 8e12 of the 1e13 budget: 1.2 of them
    # (1.25 to a tenth), 60 steps; eval_loss on 11.9k eval tokens twice is a third of the 71.4k trained on.
    "sft chat lora (budget)": ({}, dict(**SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False),
                               {"learning_rate": 1e-3, "epochs": 1.2, "warmup_ratio": 0.1, "eval_steps": 30,
                                "save_steps": 30}, 60),
    "sft completion lora": ({}, dict(**PRODUCT_TITLES, parameters=SMOLLM2, fresh_head=False),
                            {"learning_rate": 1e-3, "epochs": 3.0, "warmup_ratio": 0.1, "eval_steps": 30,
                             "save_steps": 30}, 150),
    # Virtual tokens take the same rate at any size; on a GPU (budget None) nothing bounds the 3 epochs.
    "sft prompt on a GPU, no eval": ({"method": "prompt"},
                                     dict(examples=400, tokens=59465, eval_tokens=0, parameters=SMOLLM2,
                                          fresh_head=False, budget=None),
                                     {"learning_rate": 3e-2, "epochs": 3.0, "warmup_ratio": 0.1}, 150),
    # 1.7B parameters: full 5e-5 x sqrt(135M / 1.7B) = 1.4e-5 -> 1e-5, lora 1e-3 x (135M / 1.7B)^0.25 -> 5e-4.
    # 100k examples on a CPU: the budget allows 0.03% of an epoch; a run gets 1% at least.
    "sft full 1.7B, big data, CPU": ({"method": "full"},
                                     dict(examples=100_000, tokens=20_000_000, eval_tokens=0, parameters=1.7e9,
                                          fresh_head=False),
                                     {"learning_rate": 1e-5, "epochs": 0.01, "warmup_ratio": 0.1}, 125),
    # On a GPU one epoch is 12500 steps: warm-up stops at 100 steps.
    "sft lora 1.7B, big data, GPU": ({}, dict(examples=100_000, tokens=20_000_000, eval_tokens=0, parameters=1.7e9,
                                              fresh_head=False, budget=None),
                                     {"learning_rate": 5e-4, "epochs": 1.0, "warmup_ratio": 0.008}, 12500),
    # The chat-lora recipe's adapter: alpha 32 doubles the update, so half the rate, the recipe's 5e-4.
    "sft lora alpha 32": ({"method": {"name": "lora", "r": 16, "alpha": 32}, "epochs": 1},
                          dict(**SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False),
                          {"learning_rate": 5e-4, "warmup_ratio": 0.1, "eval_steps": 25, "save_steps": 25}, 50),
    # A 1.7B classifier under lora: 5e-4 for the adapter is too low for the fresh head.
    "classify lora 1.7B": ({"task": "classify"}, dict(**TICKETS, parameters=1.7e9, fresh_head=True, budget=None),
                           {"learning_rate": 2e-3, "epochs": 3.0, "warmup_ratio": 0.1, "eval_steps": 38,
                            "save_steps": 38}, 189),
    # 12 examples are 2 steps of 8: 10 passes at most.
    "tiny data": ({"method": "ia3"}, dict(examples=12, tokens=240, eval_tokens=0, parameters=135e6, fresh_head=False),
                  {"learning_rate": 3e-3, "epochs": 10.0, "warmup_ratio": 0.1}, 20),
}


@pytest.mark.parametrize("name", CASES)
def test_chosen_values(name):
    raw, sizes, values, total = CASES[name]
    result = chosen(raw, **sizes)
    assert result.values == values
    assert result.total_steps == total
    assert result.reasons.keys() == values.keys() - {"save_steps"}  # save_steps goes with eval_steps


def test_each_choice_is_one_readable_line():
    reasons = chosen({"model": "minilm-l6", "task": "classify"}, **TICKETS, parameters=MINILM, fresh_head=True).reasons
    assert reasons == {
        "learning_rate": "learning_rate 2e-3: lora with a new classification head on a 22.7M-parameter model (1e-3 "
                         "at 135M parameters and alpha 16 x (135M / 22.7M)^0.25)",
        "epochs": "epochs 3: 500 examples make 63 steps of 8; 3 epochs give at least 150 optimizer steps",
        "warmup_ratio": "warmup_ratio 0.1: the learning rate ramps up over the first 19 of 189 steps (10%, at most "
                        "100)",
        "eval_steps": "eval_steps 38: evaluate (and checkpoint) 5 times in 189 steps: at most 5, and 1.6k eval tokens "
                      "each, at most 0.5x the 24.8k tokens trained on"}
    head = chosen({"task": "classify"}, **TICKETS, parameters=1.7e9, fresh_head=True).reasons["learning_rate"]
    assert head == ("learning_rate 2e-3: lora with a new classification head on a 1.7B-parameter model; the head "
                    "trains at the lora rate and needs at least 2e-3 (lora alone: 5e-4)")
    budget = chosen({}, **SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False).reasons["epochs"]
    assert budget.startswith("epochs 1.2: not 3 (400 examples make 50 steps of 8; 3 epochs give at least 150 "
                             "optimizer steps): an epoch is 59.5k tokens through 134.5M parameters")


def test_a_step_timed_on_this_cpu_bounds_the_plan_to_its_minutes():
    # A step in training takes STEP_OVERHEAD (1.2x) the timed one: 1200 tokens in 2 s are 500 tokens/s, 8 min
    # 240k tokens; five evaluations of 11.9k tokens cost a third of that each (19.8k): 3.7 epochs, the 3 wanted fit.
    fast = chosen({}, **SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False,
                  speed=Speed(seconds=2.0, tokens=1200, examples=8))
    assert fast.values["epochs"] == 3.0 and fast.total_steps == 150
    # 100 tokens/s: 48k tokens. Five evaluations would take 19.8k, but a short run evaluates less (at most half
    # the tokens it trains, at a third of the cost each): epochs x 59.5k x (1 + 1/6) = 48k: 0.69 of an epoch.
    slow = chosen({}, **SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False,
                  speed=Speed(seconds=10.0, tokens=1200, examples=8))
    assert slow.values["epochs"] == 0.69 and slow.total_steps == 35
    assert CPU_SECONDS * 100 / (SUPPORT_CHAT["tokens"] * (1 + 1 / 6)) == pytest.approx(0.6918, abs=1e-4)
    assert slow.reasons["epochs"] == (
        "epochs 0.69: not 3 (400 examples make 50 steps of 8; 3 epochs give at least 150 optimizer steps): an epoch "
        "is 59.5k tokens through 134.5M parameters, and ~8 min of training and evaluation on this CPU is 6e12 "
        "parameter-tokens (one step of 8 examples took 10.0 s here, 1.2x that in training: 100 tokens/s); set "
        "epochs or max_steps to train longer")
    # The evaluations the plan pays for are the ones it then chooses: at most half the tokens trained on.
    trained = slow.values["epochs"] * SUPPORT_CHAT["tokens"]
    evaluations = -(-slow.total_steps // slow.values["eval_steps"])
    assert evaluations * SUPPORT_CHAT["eval_tokens"] <= 0.5 * trained + SUPPORT_CHAT["eval_tokens"]
    # Without an eval split all of it trains: 48k / 59.5k = 0.80 of an epoch.
    alone = chosen({}, **{**SUPPORT_CHAT, "eval_tokens": 0}, parameters=SMOLLM2, fresh_head=False,
                   speed=Speed(seconds=10.0, tokens=1200, examples=8))
    assert alone.values["epochs"] == 0.8
    # A preference run's reference pass counts against the minutes: 240 s of 480 spent halve what trains.
    spent = chosen({}, **SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False,
                   speed=Speed(seconds=10.0, tokens=1200, examples=8, spent=240.0))
    assert spent.values["epochs"] == 0.34 and spent.total_steps == 17
    assert "1.2x that in training: 100 tokens/s; the reference pass took 240 s of them)" in spent.reasons["epochs"]
    spent_all = chosen({}, **SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False,
                       speed=Speed(seconds=10.0, tokens=1200, examples=8, spent=600.0))
    assert spent_all.values["epochs"] == 0.01 and spent_all.total_steps == 1
    # On a GPU (budget None) nothing bounds the plan, however slow a step.
    gpu = chosen({}, **SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False, budget=None,
                 speed=Speed(seconds=100.0, tokens=1200, examples=8))
    assert gpu.values["epochs"] == 3.0


def test_a_default_run_plans_from_a_step_it_timed_and_a_resumed_one_from_the_same(assets, tmp_path, monkeypatch):
    """epochs unset on a CPU: one step is timed (here: as slow as 1 token/s), the plan shrinks to what ~8 min
    of it trains, the timing is kept for --resume (which times nothing) and goes when the run is done."""
    timed = []

    def slow(trainer, examples, tokens):
        timed.append(len(examples))
        return Speed(seconds=1.0, tokens=1, examples=len(examples))

    monkeypatch.setattr(tunesmith.training.loop, "time_one_step", slow)
    run_dir = tmp_path / "run"
    cfg = config(assets, run_dir, save_steps=2)
    del cfg["max_steps"]  # 16 examples are 4 steps of 4; 10 epochs wanted (40 steps)
    with pytest.raises(RunError, match="interrupted at step 4"):
        run_train(cfg, callbacks=[CtrlC(4)])
    kept = json.loads((run_dir / "step_time.json").read_text())
    assert kept == {"seconds": 1.0, "tokens": 1, "examples": 4, "spent": 0.0} and timed == [4]
    monkeypatch.setattr(tunesmith.training.loop, "time_one_step", lambda *a: pytest.fail("timed again on resume"))
    run, trainer = run_train(cfg, resume=True)
    info = json.loads((run.path / "run.json").read_text())
    epochs = yaml.safe_load((run.path / "train_config.yaml").read_text())["epochs"]
    # 8 min at 1 token/s is 480 tokens: fewer than 10 epochs of this data (~200 tokens each), more than one
    assert 1 <= epochs < 10 and trainer.state.max_steps == round(epochs * 4)
    assert "took 1.0 s here, 1.2x that in training: 1 tokens/s" in info["defaults"]["epochs"]
    assert [step for step, _ in logged_losses(run_dir)] == list(range(1, trainer.state.max_steps + 1))
    assert not (run_dir / "step_time.json").exists()


# ---------------------------------------------------------------------------------------------------------
# explicit values always win
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("learning_rate", 7e-4), ("epochs", 2.0), ("warmup_ratio", 0.0),
                                          ("eval_steps", 10)])
def test_an_explicit_value_is_kept(field, value):
    result = chosen({field: value}, **SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False)
    assert field not in result.values and field not in result.reasons


def test_a_fully_set_config_gets_nothing_chosen():
    raw = {"learning_rate": 1e-4, "epochs": 2, "warmup_ratio": 0.05, "eval_steps": 10, "save_steps": 10}
    result = chosen(raw, **TICKETS, parameters=MINILM, fresh_head=True)
    assert result.values == {} and result.reasons == {} and result.total_steps == 2 * 63


def test_max_steps_decides_and_epochs_records_what_it_amounts_to():
    result = chosen({"max_steps": 40}, **SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False)
    assert result.total_steps == 40
    assert result.values["epochs"] == 0.8 and result.values["warmup_ratio"] == 0.1 and result.values["eval_steps"] == 40
    assert result.reasons["epochs"] == ("epochs 0.8: what max_steps 40 amounts to (400 examples make 50 steps of 8); "
                                        "max_steps decides")


def test_own_checkpoints_are_evaluated_and_own_evaluations_checkpointed():
    sizes = dict(**SUPPORT_CHAT, parameters=SMOLLM2, fresh_head=False)
    assert chosen({"save_steps": 20}, **sizes).values["eval_steps"] == 20
    own_eval = chosen({"eval_steps": 10}, **sizes).values
    assert own_eval["save_steps"] == 10 and "eval_steps" not in own_eval
    assert "save_steps" not in chosen({"eval_steps": 10}, **{**sizes, "eval_tokens": 0}).values  # nothing to keep


@pytest.mark.parametrize("raw, has_eval, best", [
    ({"task": "sft", "eval_steps": 10, "save_steps": 10}, True, ("eval_loss", False)),
    ({"task": "classify", "eval_steps": 10, "save_steps": 10}, True, ("eval_accuracy", True)),
    ({"task": "ner", "eval_steps": 10, "save_steps": 10}, True, ("eval_f1", True)),
    # Not every evaluation is a checkpoint: the step that scored best may have none.
    ({"task": "classify", "eval_steps": 2, "save_steps": 100}, True, None),
    ({"task": "classify", "eval_steps": 10, "save_steps": 20}, True, None),
    ({"task": "classify", "eval_steps": 10, "save_steps": 10}, False, None),
    ({"task": "classify", "eval_steps": 10, "early_stopping": {"metric": "eval_macro_f1"}}, True,
     ("eval_macro_f1", True)),
])
def test_the_best_checkpoint_is_judged_by_the_tasks_metric(raw, has_eval, best):
    assert best_checkpoint(load_config({"data": {"train": "train.jsonl"}, **raw}), has_eval) == best


# ---------------------------------------------------------------------------------------------------------
# end to end on the tiny models
# ---------------------------------------------------------------------------------------------------------

def test_the_run_saves_the_chosen_values_and_a_rerun_from_them_trains_the_same(assets, tmp_path):
    cfg = config(assets, tmp_path / "a", model=str(assets.bert), task="classify", method={"name": "lora"},
                 data={"train": str(assets.classify), "eval": str(assets.classify)}, max_length=64)
    del cfg["learning_rate"], cfg["warmup_ratio"], cfg["max_steps"], cfg["save_steps"]
    run, _ = run_train(cfg)
    saved = yaml.safe_load((run.path / "train_config.yaml").read_text())
    # 12 examples are 3 steps of 4: 10 epochs (the most), 30 steps, evaluated and checkpointed every 6.
    assert {k: saved[k] for k in ("epochs", "max_steps", "warmup_ratio", "eval_steps", "save_steps")} == {
        "epochs": 10.0, "max_steps": -1, "warmup_ratio": 0.1, "eval_steps": 6, "save_steps": 6}
    assert isinstance(saved["learning_rate"], float) and saved["learning_rate"] >= 2e-3  # a fresh head under lora
    info = json.loads((run.path / "run.json").read_text())
    # precision auto: a bf16 frozen base where the CPU multiplies bf16 natively; a tiny model's activations fit
    assert saved["precision"] == ("bf16" if bf16_native("cpu") else "fp32") and saved["recompute"] is False
    assert info["defaults"].keys() == {"learning_rate", "epochs", "warmup_ratio", "eval_steps", "best_checkpoint",
                                       "precision", "recompute"}

    again, _ = run_train({**saved, "output_dir": str(tmp_path / "b")})
    assert json.loads((again.path / "run.json").read_text())["defaults"].keys() == {"best_checkpoint"}
    first, second = weights(run.path), weights(again.path)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0)


def test_the_run_keeps_and_ends_with_the_best_checkpoint(assets, tmp_path, monkeypatch):
    # eval_accuracy as scripted per evaluation: the best is step 2, after which the metric only falls.
    scripted = iter([0.2, 0.9, 0.5, 0.1])
    monkeypatch.setattr(tunesmith.training.loop, "eval_metrics_fn",
                        lambda task, labels: lambda pred: {"accuracy": next(scripted)})
    saved, kept = {}, []

    class Saves(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):  # after RunTrainer pruned
            directory = Path(args.output_dir)
            saved[state.global_step] = load_file(directory / f"checkpoint-{state.global_step}" / "model.safetensors")
            kept.append(sorted(p.name for p in directory.iterdir()))

    cfg = config(assets, tmp_path / "run", model=str(assets.bert), task="classify", method={"name": "full"},
                 data={"train": str(assets.classify), "eval": str(assets.classify)}, max_length=64, max_steps=4,
                 eval_steps=1, save_total_limit=1)
    del cfg["save_steps"]
    run, trainer = run_train(cfg, callbacks=[Saves()])
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    # save_total_limit 1 keeps the newest checkpoint, and the best one besides.
    assert kept == [["checkpoint-1"], ["checkpoint-2"], ["checkpoint-2", "checkpoint-3"],
                    ["checkpoint-2", "checkpoint-4"]]
    final = weights(run.path)
    assert not torch.equal(saved[2]["classifier.weight"], saved[4]["classifier.weight"])
    for key, value in saved[2].items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0)
    assert "best checkpoint: the run ends with the checkpoint of the best eval_accuracy" in \
        json.loads((run.path / "run.json").read_text())["defaults"]["best_checkpoint"]

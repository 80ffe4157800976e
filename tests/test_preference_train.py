"""task: preference through the one loop, on tiny random models: every objective trains with LoRA and full and logs
TRL's reward metrics each step; a run continuing an SFT run starts from its weights and keeps it, unchanged, as the
reference; held-out preference accuracy and the parent's own task metric before and after; the defaults; a resumed
run; and the loss equal to TRL's own trainers' on the same batch and weights."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_llama
from test_train import CtrlC, assets, config, logged_losses, run_train, weights  # noqa: F401 (assets: a fixture)
from tunesmith.config import PreferenceConfig, load_config
from tunesmith.data.tokenize import encode_chat_prompt
from tunesmith.evaluation.preference import reply_log_probs
from tunesmith.models import load_causal_lm, load_run
from tunesmith.runs import RunError
from tunesmith.training import train
from tunesmith.training.defaults import resolve
from tunesmith.training.preference import PreferenceTrainer, configure
from tunesmith.training.preference_data import PreferenceCollator, attach_reference, build, log_probs

OBJECTIVES = ("dpo", "orpo", "simpo", "kto")
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def pair(i: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"It is {2 * i + 1}, I think."}]}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair(i)) + "\n" for i in range(16)))
    return path


def preference(assets, pairs, out: Path, objective: str = "dpo", **overrides) -> dict:
    """A 3-step preference run on the pairs (test_train.config's settings: no eval split, no 'before')."""
    return config(assets, out, task="preference", **{"preference": {"objective": objective},
                                                      "data": {"train": str(pairs), "eval_fraction": 0}, **overrides})


def log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# every objective trains, LoRA and full, and logs the reward metrics
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_and_logs_rewards_each_step(objective, method, assets, pairs, tmp_path):
    run, trainer = run_train(preference(assets, pairs, tmp_path / "run", objective, method={"name": method}))
    steps = [e for e in log_lines(tmp_path / "run") if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3]
    for entry in steps:
        # KTO's batches of single replies may hold no good (or no bad) one: TRL logs no margin for those
        expected = {"rewards/accuracies", "kl"} if objective == "kto" else set(REWARDS)
        assert expected <= set(entry) and all(math.isfinite(entry[k]) for k in (*expected, "loss"))
        assert 0 <= entry["rewards/accuracies"] <= 1
        if "rewards/margins" in entry:
            assert entry["rewards/margins"] == pytest.approx(entry["rewards/chosen"] - entry["rewards/rejected"],
                                                             abs=1e-5)
    if objective == "orpo":
        assert all({"nll_loss", "log_odds_ratio"} <= set(e) for e in steps)
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad
             and not torch.equal(p.detach(), trainer.initial[n])]
    assert moved, "no trainable parameter changed"
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["task"] == "sft" and info["preference"]["objective"] == objective
    assert info["versions"]["trl"] == "1.16.0"
    assert run.metrics["train"]["examples"] == 16


def test_the_features_hold_each_reply_and_the_reference(assets, pairs):
    from tunesmith.models import load_tokenizer

    cfg = load_config(preference(assets, pairs, Path("unused")))
    tokenizer = load_tokenizer(str(assets.lm))
    features, stats = build(cfg, tokenizer, [pair(3)], "pairs", {})
    [feature] = features
    assert set(feature) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "index"}
    learnable = [t for t, label in zip(feature["chosen_input_ids"], feature["chosen_labels"]) if label != -100]
    assert tokenizer.decode(learnable) == "It is 6.<|im_end|>"
    assert stats.examples == 1 and stats.tokens == len(feature["chosen_input_ids"]) + len(feature["rejected_input_ids"])
    batch = PreferenceCollator(tokenizer.pad_token_id)(features * 2)
    assert batch["input_ids"].shape[0] == 4  # [chosen, chosen, rejected, rejected]
    assert batch["completion_mask"][0].sum() == len(learnable)
    assert "ref_chosen_logps" not in batch
    attach_reference(features, {"chosen": [(-1.5, 5)], "rejected": [(-2.5, 9)]})
    batch = PreferenceCollator(tokenizer.pad_token_id)(features)
    assert batch["ref_chosen_logps"].tolist() == [-1.5] and batch["ref_rejected_logps"].tolist() == [-2.5]


def test_the_wrong_kind_of_data_is_a_sentence(assets, pairs, tmp_path):
    from tunesmith.config import ConfigError
    from tunesmith.data.formats import DataError

    with pytest.raises(ConfigError, match="holds chat records, but task preference trains on preference or "
                                          "unpaired data"):
        train(preference(assets, pairs, tmp_path / "a", data={"train": str(assets.chat), "eval_fraction": 0}))
    single = tmp_path / "kto.jsonl"
    single.write_text(json.dumps({"prompt": "Q: 2+2?\nA:", "completion": " 4", "label": True}) + "\n")
    with pytest.raises(DataError, match="holds single replies marked good or bad; objective dpo learns from pairs"):
        train(preference(assets, pairs, tmp_path / "b", data={"train": str(single), "eval_fraction": 0}))


# ---------------------------------------------------------------------------------------------------------
# continue_from an SFT run: its weights are the start and, unchanged, the reference
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["lora", "full"])
def sft_then_dpo(request, assets, pairs, tmp_path_factory):
    """An sft run (with an eval split, so it has a task score), then a DPO run continuing it: (sft dir, dpo run,
    dpo trainer, the sft run's logits on a probe before the DPO run)."""
    method = {"name": request.param}
    root = tmp_path_factory.mktemp(f"continue-{request.param}")
    sft = root / "sft"
    train(config(assets, sft, method=method, data={"train": str(assets.chat), "eval_fraction": 0.25},
                 evaluate_before=False, eval_max_new_tokens=4, precision="fp32"))
    before = probe_logits(sft)
    run, trainer = run_train(preference(assets, pairs, root / "dpo", continue_from=str(sft), method=method,
                                        preference={"objective": "dpo", "sft_weight": 0},  # plain DPO: loss log 2
                                        data={"train": str(pairs), "eval_fraction": 0.25},
                                        evaluate_before=True, eval_max_new_tokens=4, precision="fp32"))
    return sft, run, trainer, before


def probe_logits(run_dir: Path) -> torch.Tensor:
    model, tokenizer, _ = load_run(run_dir)
    ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": "What is 7+7?"}])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_a_continued_run_starts_from_the_sft_weights(sft_then_dpo):
    sft, _, trainer, _ = sft_then_dpo
    saved = weights(sft)
    initial = {n.replace(".default", "").removeprefix("base_model.model."): p for n, p in trainer.initial.items()}
    for key, value in saved.items():
        name = key.removeprefix("base_model.model.")
        torch.testing.assert_close(initial[name], value, rtol=0, atol=0)


def test_the_policy_at_step_0_is_the_reference_so_the_first_rewards_are_zero(sft_then_dpo):
    """The first step's rewards are computed before its update: every one is 0 (to float rounding: the reference's
    log-probs come from an inference pass, the policy's from the training one) only if the policy then is the
    reference, the SFT run; the base model would be ~1e-2 away (test_the_reference_is_the_sft_run...)."""
    _, run, _, _ = sft_then_dpo
    first = next(e for e in log_lines(run.path) if "loss" in e)
    assert first["step"] == 1
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[name] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # -log sigmoid(0)


def test_the_reference_is_the_sft_run_and_stays_fixed(sft_then_dpo, assets):
    sft, run, trainer, before = sft_then_dpo
    torch.testing.assert_close(probe_logits(sft), before, rtol=0, atol=0)  # the parent run is untouched
    features = list(trainer.train_dataset)
    model, tokenizer, _ = load_run(sft)  # the sft run as saved, loaded afresh after the DPO run
    now = log_probs(model, features, tokenizer.pad_token_id, 4, "sft")
    base = log_probs(load_causal_lm(str(assets.lm)), features, tokenizer.pad_token_id, 4, "base")
    used = [f["ref_chosen"] for f in features]
    assert used == pytest.approx([total for total, _ in now["chosen"]], abs=1e-4)
    assert max(abs(u - b) for u, (b, _) in zip(used, base["chosen"])) > 1e-2  # LoRA: not the bare base
    trained = log_probs(trainer.model, features, tokenizer.pad_token_id, 4, "trained")
    assert max(abs(u - t) for u, (t, _) in zip(used, trained["chosen"])) > 1e-3  # the policy moved, it did not


def test_before_and_after_hold_preference_accuracy_and_the_parents_task_metric(sft_then_dpo):
    sft, run, _, _ = sft_then_dpo
    metrics = json.loads((run.path / "metrics.json").read_text())
    parent = json.loads((sft / "metrics.json").read_text())["after"]
    before, after = metrics["before"], metrics["after"]
    assert before["preference_accuracy"] == 0.5 and before["reward_margin"] == 0.0  # the reference, against itself
    assert before["pairs"] == after["pairs"] == 4
    assert before["before_kind"] == "parent run"
    assert before["exact_match"] == parent["exact_match"] and before["loss"] == parent["loss"]
    assert {"exact_match", "rouge_l", "loss", "preference_accuracy", "logprob_accuracy"} <= set(after)
    assert after["task_data"] == before["task_data"] == str(json.loads((sft / "run.json").read_text())
                                                             ["data"]["train"]["path"])
    assert after["reward_margin"] != 0.0
    predictions = [json.loads(line) for line in (run.path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and {"input", "chosen", "rejected", "chosen_reward", "correct"} <= set(predictions[0])
    info = json.loads((run.path / "run.json").read_text())
    assert info["parent"]["path"] == str(sft.resolve()) and info["task"] == "sft"


# ---------------------------------------------------------------------------------------------------------
# defaults and resume
# ---------------------------------------------------------------------------------------------------------

def test_defaults_for_preference_objectives(assets, pairs):
    sizes = dict(examples=800, tokens=80_000, eval_tokens=0, parameters=135_000_000, fresh_head=False, budget=None)
    cfg, chosen = resolve(load_config({"task": "preference", "data": {"train": "x"}}), **sizes)
    assert (cfg.learning_rate, cfg.preference.beta, cfg.epochs) == (5e-5, 0.1, 2.0)
    assert chosen.reasons["learning_rate"].startswith("learning_rate 5e-5: dpo with lora on a 135M-parameter model: "
                                                      "1/20 of the sft rate 1e-3")
    assert chosen.reasons["beta"].startswith("beta 0.1: DPO's beta (TRL's default")
    assert cfg.preference.sft_weight == 1.0 and chosen.reasons["sft_weight"].startswith("sft_weight 1: the chosen")
    cfg, chosen = resolve(load_config({"task": "preference", "data": {"train": "x"}, "method": "full",
                                       "preference": {"objective": "orpo"}}), **{**sizes, "examples": 40})
    assert (cfg.learning_rate, cfg.preference.beta, cfg.epochs) == (1e-5, 0.1, 3.0)
    assert cfg.preference.sft_weight is None and "sft_weight" not in chosen.reasons  # orpo has its own sft term
    assert "at most 3 passes over preference pairs" in chosen.reasons["epochs"]
    cfg, _ = resolve(load_config({"task": "preference", "data": {"train": "x"}, "preference": {"objective": "simpo",
                                                                                                "beta": 2.5}}), **sizes)
    assert cfg.preference.beta == 2.5  # set, so kept


def test_a_cpu_plan_counts_the_reference_pass_against_its_minutes(assets, pairs, tmp_path, monkeypatch):
    """epochs unset on a CPU: the reference pass (made to take over a second here) is timed, kept beside the timed
    step for --resume, and named in the epochs reason (defaults.Speed.budget subtracts it: test_defaults). The
    timed step's tokens are counted as the epoch's are: a batch's prompts once (its padded collation holds each
    pair's prompt twice, which made the plan's tokens/s several times too high)."""
    import time

    import tunesmith.training.loop as loop
    from tunesmith.training.data import feature_tokens
    from tunesmith.training.defaults import Speed
    from tunesmith.training.preference_data import epoch_tokens

    real, timed = loop.reference_pass, []

    def slow_reference(*args, **kwargs):
        time.sleep(1.2)
        return real(*args, **kwargs)

    def timing(trainer, examples, tokens):
        timed.append((examples, tokens))
        return Speed(seconds=1.0, tokens=1, examples=len(examples))

    monkeypatch.setattr(loop, "reference_pass", slow_reference)
    monkeypatch.setattr(loop, "time_one_step", timing)
    cfg = preference(assets, pairs, tmp_path / "run", save_steps=2)
    del cfg["max_steps"]
    with pytest.raises(RunError, match="interrupted at step 3"):
        run_train(cfg, callbacks=[CtrlC(3)])
    kept = json.loads((tmp_path / "run" / "step_time.json").read_text())
    assert kept["seconds"] == 1.0 and 1.2 <= kept["spent"] < 60
    [(examples, tokens)] = timed
    assert len(examples) == 4 and tokens == epoch_tokens(examples, 4) < sum(feature_tokens(f) for f in examples)
    monkeypatch.setattr(loop, "time_one_step", lambda *a: pytest.fail("timed again on resume"))
    run, _ = run_train(cfg, resume=True)
    reason = json.loads((run.path / "run.json").read_text())["defaults"]["epochs"]
    assert f"1.2x that in training: 1 tokens/s; the reference pass took {kept['spent']:.0f} s of them)" in reason


def test_preference_settings_are_checked(assets):
    from tunesmith.config import ConfigError

    with pytest.raises(ConfigError, match="preference settings apply to task: preference only"):
        load_config({"data": {"train": "x"}, "preference": {"objective": "kto"}})
    with pytest.raises(ConfigError, match="prompt tuning is not supported"):
        load_config({"task": "preference", "data": {"train": "x"}, "method": "prompt"})
    assert load_config({"task": "preference", "data": {"train": "x"}}).preference == PreferenceConfig()


def test_resume_reproduces_an_uninterrupted_preference_run(assets, pairs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = dict(max_steps=4, save_steps=2, precision="fp32")
    run_a, _ = run_train(preference(assets, pairs, a, **common))
    with pytest.raises(RunError, match="interrupted at step 4; continue from checkpoint-2"):
        run_train(preference(assets, pairs, b, **common), callbacks=[CtrlC(4)])
    run_train(preference(assets, pairs, b, **common), resume=True)
    (steps_a, losses_a), (steps_b, losses_b) = zip(*logged_losses(a)), zip(*logged_losses(b))
    assert steps_a == steps_b == (1, 2, 3, 4)
    assert losses_b == pytest.approx(losses_a, abs=1e-5)
    assert [e["rewards/margins"] for e in log_lines(b) if "loss" in e] == pytest.approx(
        [e["rewards/margins"] for e in log_lines(a) if "loss" in e], abs=1e-5)
    for key, value in weights(a).items():
        torch.testing.assert_close(weights(b)[key], value, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the loss is TRL's: equal to TRL's own trainers on the same batch and weights
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(assets):
    """(tokenizer, policy, reference): two different tiny Llamas, the policy full fine-tuned."""
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(str(assets.lm))
    return tokenizer, build_tiny_llama(tokenizer, seed=1).train(), build_tiny_llama(tokenizer, seed=2).eval()


def ours(objective: str, tiny, records: list[dict], tmp_path, share: bool = False,
         **settings) -> tuple[torch.Tensor, dict, dict]:
    """(loss, the batch, TRL-named metrics) of tunesmith's trainer on one batch of `records`; `share`: the model
    runs on the batch's prefix tree."""
    from transformers import TrainingArguments

    tokenizer, policy, reference = tiny
    cfg = load_config({"task": "preference", "data": {"train": "x"}, "method": "full",
                       "preference": {"objective": objective, **settings}})
    features, _ = build(cfg, tokenizer, records, "records", {})
    if objective in ("dpo", "kto"):
        attach_reference(features, log_probs(reference, features, tokenizer.pad_token_id, 8, "reference"))
    collate = PreferenceCollator(tokenizer.pad_token_id)
    trainer = PreferenceTrainer(model=policy, args=TrainingArguments(output_dir=str(tmp_path / "ours"),
                                                                    report_to="none", use_cpu=True),
                                train_dataset=features, data_collator=collate)
    configure(trainer, cfg.preference.model_copy(update={"beta": cfg.preference.beta or 0.1}), share=share)
    batch = collate(features)
    loss = trainer.compute_loss(policy, batch)
    return loss, batch, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_args(kind, tmp_path, **settings):
    return kind(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, **settings)


def test_dpo_loss_equals_trls_dpo_trainer(tiny, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    records = [pair(i) for i in range(4)]
    loss, batch, metrics = ours("dpo", tiny, records, tmp_path, beta=0.1)
    tokenizer, policy, reference = tiny
    trl = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tokenizer,
                     args=trl_args(DPOConfig, tmp_path, beta=0.1), train_dataset=Dataset.from_list(records))
    theirs = trl.compute_loss(trl.model, {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")})
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5) and abs(loss.item() - math.log(2)) > 1e-3
    for name in REWARDS:
        assert metrics[name] == pytest.approx(trl._metrics["train"][name][-1], abs=1e-5)


def test_dpo_with_its_sft_term_equals_trls_dpo_trainer_with_loss_types_sigmoid_and_sft(tiny, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    records = [pair(i) for i in range(4)]
    plain, _, _ = ours("dpo", tiny, records, tmp_path, beta=0.1)
    loss, batch, metrics = ours("dpo", tiny, records, tmp_path, beta=0.1, sft_weight=0.5)
    tokenizer, policy, reference = tiny
    args = trl_args(DPOConfig, tmp_path, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    trl = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tokenizer,
                     args=args, train_dataset=Dataset.from_list(records))
    theirs = trl.compute_loss(trl.model, {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")})
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5) and loss.item() - plain.item() > 0.1
    for name in REWARDS:
        assert metrics[name] == pytest.approx(trl._metrics["train"][name][-1], abs=1e-5)


def test_kto_loss_equals_trls_kto_trainer(tiny, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from tunesmith.data.preference import to_unpaired

    records = [single for i in range(4) for single in to_unpaired(pair(i))]
    loss, batch, metrics = ours("kto", tiny, records, tmp_path, beta=0.1)
    tokenizer, policy, reference = tiny
    trl = KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tokenizer,
                     args=trl_args(KTOConfig, tmp_path, beta=0.1), train_dataset=Dataset.from_list(records))
    keys = ("input_ids", "attention_mask", "completion_mask", "label", "KL_input_ids", "KL_attention_mask",
            "KL_completion_mask")
    theirs = trl.compute_loss(trl.model, {k: batch[k] for k in keys})
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5)
    for name in ("kl", "rewards/chosen", "rewards/rejected"):
        assert metrics[name] == pytest.approx(trl._metrics["train"][name][-1], abs=1e-5)


def _trl_pair_batch(batch: dict) -> dict:
    """Our [chosen; rejected] batch as TRL's ORPO and CPO trainers take it (their labels: the reply tokens)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = {}
    for name, rows in zip(("chosen", "rejected"), range(2)):
        half = slice(rows * len(labels) // 2, (rows + 1) * len(labels) // 2)
        out.update({f"{name}_input_ids": batch["input_ids"][half], f"{name}_attention_mask":
                    batch["attention_mask"][half], f"{name}_labels": labels[half]})
    return out


def test_orpo_odds_ratio_term_equals_trls_orpo_trainer(tiny, tmp_path):
    """TRL's ORPO adds an NLL over prompt and reply, tunesmith's over the reply (what sft learns): the odds-ratio
    term and the replies' mean log-probabilities are compared."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    records = [pair(i) for i in range(4)]
    loss, batch, metrics = ours("orpo", tiny, records, tmp_path, beta=0.1)
    tokenizer, policy, _ = tiny
    trl = ORPOTrainer(model=copy.deepcopy(policy), processing_class=tokenizer, args=trl_args(ORPOConfig, tmp_path,
                      beta=0.1), train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    theirs, trl_metrics = trl.get_batch_loss_metrics(trl.model, _trl_pair_batch(batch))
    assert loss.item() - metrics["nll_loss"] == pytest.approx(theirs.item() - trl_metrics["nll_loss"], abs=1e-5)
    for name in ("log_odds_ratio", "logps/chosen", "logps/rejected", *REWARDS):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5)


def test_simpo_loss_equals_trls_cpo_trainer_with_loss_type_simpo(tiny, tmp_path):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    records = [pair(i) for i in range(4)]
    loss, batch, metrics = ours("simpo", tiny, records, tmp_path, beta=2.0, simpo_gamma=1.0)
    tokenizer, policy, _ = tiny
    trl = CPOTrainer(model=copy.deepcopy(policy), processing_class=tokenizer,
                     args=trl_args(CPOConfig, tmp_path, beta=2.0, loss_type="simpo", simpo_gamma=1.0, cpo_alpha=0.0),
                     train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    theirs, trl_metrics = trl.get_batch_loss_metrics(trl.model, _trl_pair_batch(batch))
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# share_prefix: each prompt computed once (data/prefix_tree.py), the same numbers as the padded batches
# ---------------------------------------------------------------------------------------------------------

def records_of(objective: str, n: int) -> list[dict]:
    from tunesmith.data.preference import to_unpaired

    pairs = [pair(i) for i in range(n)]
    return [single for p in pairs for single in to_unpaired(p)] if objective == "kto" else pairs


def embedded_shapes(model) -> tuple[list, object]:
    """(the shapes of the token ids each forward pass of `model` embeds, the hook to remove)."""
    shapes = []
    return shapes, model.get_input_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(a[0].shape)))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_step_on_prefix_trees_equals_the_padded_step(objective, tiny, tmp_path):
    from tunesmith.data.prefix_tree import prefix_tree

    _, policy, _ = tiny
    results = {}
    for share in (False, True):
        policy.zero_grad()
        shapes, hook = embedded_shapes(policy)
        loss, batch, metrics = ours(objective, tiny, records_of(objective, 4), tmp_path / str(share), share=share,
                                    beta=0.1)
        hook.remove()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results[share] = loss.item(), metrics, grads, shapes
    assert prefix_tree(batch["input_ids"], batch["attention_mask"]) is not None
    assert all(s[0] > 1 for s in results[False][3]) and all(s[0] == 1 for s in results[True][3])  # padded, tree
    assert len(results[True][3]) == (2 if objective == "kto" else 1)  # KTO: its replies, then its KL replies
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    assert results[True][1].keys() == results[False][1].keys()
    for name, value in results[False][1].items():
        assert results[True][1][name] == pytest.approx(value, abs=1e-5), name
    assert results[True][2].keys() == results[False][2].keys() and results[False][2]
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_the_reference_on_prefix_trees_equals_scoring_each_reply_apart(objective, tiny):
    """The former reference pass scored all chosen replies, then all rejected ones; now a feature's replies share
    a batch and, with share, one row per batch: the same (sum, count) per reply."""
    tokenizer, _, reference = tiny
    cfg = load_config({"task": "preference", "data": {"train": "x"}, "method": "full",
                       "preference": {"objective": objective}})
    features, _ = build(cfg, tokenizer, records_of(objective, 6), "records", {})
    replies = ("completion", "KL") if objective == "kto" else ("chosen", "rejected")
    keys = {r: ("input_ids", "labels") if r == "completion" else (f"{r}_input_ids", f"{r}_labels") for r in replies}
    apart = {r: reply_log_probs(reference, [{"input_ids": f[keys[r][0]], "labels": f[keys[r][1]]} for f in features],
                                tokenizer.pad_token_id, batch_size=4) for r in replies}
    shapes, hook = embedded_shapes(reference)
    shared = log_probs(reference, features, tokenizer.pad_token_id, 4, "reference", share=True)
    hook.remove()
    padded = log_probs(reference, features, tokenizer.pad_token_id, 4, "reference")
    # 6 pairs (kto: 12 single replies) in batches of 4 features, their 2 replies each: one row per batch
    assert len(shapes) == (3 if objective == "kto" else 2) and all(s[0] == 1 for s in shapes)
    for scores in (shared, padded):
        assert list(scores) == list(replies)
        for reply in replies:
            assert [n for _, n in scores[reply]] == [n for _, n in apart[reply]]
            assert [s for s, _ in scores[reply]] == pytest.approx([s for s, _ in apart[reply]], abs=1e-5)


def test_an_epoch_costs_a_pairs_prompt_once_and_ktos_two_batches_apart():
    from tunesmith.training.preference_data import epoch_tokens

    system, a, b = [1] * 10, [2] * 8, [3] * 8  # a shared system prompt, two prompts of their own
    pairs = [{"chosen_input_ids": system + a + [4, 5], "rejected_input_ids": system + a + [6]},
             {"chosen_input_ids": system + b + [7], "rejected_input_ids": system + b + [8, 9, 9]}]
    assert epoch_tokens(pairs, batch_size=2) == 10 + (8 + 3) + (8 + 4)  # 57 real tokens
    assert epoch_tokens(pairs, batch_size=1) == (18 + 3) + (18 + 4)
    # KTO: its replies and its mismatched (KL) replies are two forward passes, each on its own tree
    single = [{"input_ids": system + a + [4], "KL_input_ids": system + a + [6]},
              {"input_ids": system + b + [7], "KL_input_ids": system + b + [8]}]
    assert epoch_tokens(single, batch_size=2) == 2 * (10 + 9 + 9)
    assert epoch_tokens([], batch_size=2) == 0


def test_a_dpo_run_sharing_prompts_equals_one_padding(assets, pairs, tmp_path, capsys, monkeypatch):
    """share_prefix (the default) on and off: the same reference, logged losses, held-out scores and weights; the
    run says what an epoch costs, and its steps ran on prefix trees."""
    from tunesmith.data import prefix_tree as trees

    made, real = [], trees.prefix_tree
    monkeypatch.setattr(trees, "prefix_tree", lambda *a, **k: made.append(out := real(*a, **k)) or out)
    results = {}
    for share in (True, False):
        capsys.readouterr()
        run, _ = run_train(preference(assets, pairs, tmp_path / str(share), share_prefix=share, precision="fp32",
                                      data={"train": str(pairs), "eval_fraction": 0.25}))
        err = capsys.readouterr().err
        metrics = json.loads((run.path / "metrics.json").read_text())["after"]
        results[share] = ([e["loss"] for e in log_lines(run.path) if "loss" in e], metrics, weights(run.path), err)
        if share:
            assert made and all(tree is not None for tree in made)  # reference, 3 steps, held-out: all on trees
            calls = len(made)
    assert len(made) == calls  # share_prefix: false never builds one
    assert "batches: the tokens a batch's replies begin with alike (a pair's prompt, a system prompt) are computed " \
           "once per batch (share_prefix): an epoch costs " in results[True][3]
    assert "batches:" not in results[False][3]
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    for name in ("preference_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        assert results[True][1][name] == pytest.approx(results[False][1][name], abs=1e-5), name
    for key, value in results[False][2].items():
        torch.testing.assert_close(results[True][2][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------------------
# compare: an sft entry and a preference entry continuing it, on the same task split
# ---------------------------------------------------------------------------------------------------------

def test_compare_holds_an_sft_entry_and_a_preference_entry_continuing_it(assets, pairs, tmp_path):
    from tunesmith.compare import load_compare, run
    from tunesmith.config import ConfigError

    out = tmp_path / "cmp"
    held_out = tmp_path / "held-out-pairs.jsonl"
    held_out.write_text("".join(json.dumps(pair(i)) + "\n" for i in range(20, 24)))
    cfg = {"output_dir": str(out), "isolate": False, "metrics": ["exact_match", "preference_accuracy"],
           "base": {"model": str(assets.lm), "max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0,
                    "save_steps": 100, "eval_max_new_tokens": 4, "precision": "fp32",
                    "data": {"train": str(assets.chat), "eval": str(assets.chat)}},
           "entries": [{"name": "sft", "overrides": {}},
                       {"name": "dpo", "overrides": {"task": "preference", "continue_from": str(out / "sft" / "run"),
                                                     "data": {"train": str(pairs), "eval": str(held_out)}}}]}
    wrong = {**cfg, "entries": [cfg["entries"][0], {"name": "b", "overrides": {"data": {"eval": str(held_out)}}}]}
    with pytest.raises(ConfigError, match="entry b: seed and data.eval are shared by every entry"):
        load_compare(wrong)
    report = run(cfg)
    sft, dpo = report["entries"]
    # Both on the shared split: the sft entry's own score, and the dpo entry's through the run it continues.
    assert "exact_match" in sft["metrics"] and dpo["metrics"]["task_data"] == str(assets.chat)
    assert {"exact_match", "rouge_l", "preference_accuracy", "reward_margin"} <= set(dpo["metrics"])
    assert report["table"]["header"][3:5] == ["exact_match", "preference_accuracy"]
    assert [row[0] for row in report["table"]["rows"]] == ["sft", "dpo"]


def test_tunesmith_eval_on_preference_records_is_a_sentence(tiny, pairs):
    from tunesmith.evaluation import EvaluateError, evaluate

    tokenizer, policy, _ = tiny
    with pytest.raises(EvaluateError, match="holds preference records; a preference run scores its held-out pairs"):
        evaluate((policy, tokenizer), pairs)

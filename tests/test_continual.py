"""Continual learning on tiny models: a continued run starts exactly from its parent's weights and records its
lineage and data; replay mixes exactly the configured share, seeded; L2-SP and EWC penalties equal their
hand-computed values; `tunesmith continual` resumes after an interruption without redoing finished steps."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunesmith.training
import test_train
from test_train import config, run_train, write_jsonl
from tunesmith import runs
from tunesmith.config import ConfigError, load_config
from tunesmith.training.lineage import mix_replay
from tunesmith.training.regularize import Anchor, fisher_diagonal

assets = test_train.assets  # the tiny models and data: a session fixture shared with test_train


def trained(cfg: dict):
    """(run directory, Trainer) of a finished run_train."""
    run, trainer = run_train(cfg)
    return run.path, trainer


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapter_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter_model.safetensors")


def initial_adapter(trainer) -> dict[str, torch.Tensor]:
    """The trainable parameters as the child's Trainer had them before its first step, in peft's saved naming."""
    return {n.replace(".default", ""): p for n, p in trainer.initial.items() if "lora_" in n}


@pytest.fixture(scope="module")
def parent(assets, tmp_path_factory):
    return trained(config(assets, tmp_path_factory.mktemp("p") / "parent", method={"name": "lora", "r": 4}))[0]


def test_continued_lora_run_starts_from_the_parents_adapter_and_records_its_lineage(assets, parent, tmp_path):
    new_data = write_jsonl(tmp_path / "new.jsonl", [{"messages": [
        {"role": "user", "content": f"Double {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]} for i in range(8)])
    cfg = config(assets, tmp_path / "child", method={"name": "lora", "r": 4}, continue_from=str(parent),
                 data={"train": str(new_data), "eval_fraction": 0})
    del cfg["model"]  # taken from the parent
    child, trainer = trained(cfg)

    saved = adapter_weights(parent)
    start = initial_adapter(trainer)
    assert start.keys() == saved.keys() and len(saved) > 0
    for name, value in saved.items():
        assert torch.equal(start[name], value), name  # exactly the parent's, not a fresh init
    assert any(not torch.equal(adapter_weights(child)[n], v) for n, v in saved.items())  # and it trained on

    info = json.loads((child / "run.json").read_text())
    assert info["parent"] == {"path": str(parent.resolve()), "task": "sft", "method": "lora",
                              "base_model": str(assets.lm.resolve())}
    assert info["lineage"] == [info["parent"]]
    assert info["data"]["train"] == {"path": str(new_data.resolve()), "sha256": sha256(new_data), "examples": 8}
    assert info["data"]["eval"] is None and info["replay"] is None
    assert info["base_model"] == str(assets.lm.resolve())  # loadable by its path alone, on the same base

    # The config names only the method: the child's train_config.yaml records the adapter it trained (the
    # parent's r 4 and alpha, not LoRA's defaults r 8, alpha 16).
    parent_method = yaml.safe_load((parent / "train_config.yaml").read_text())["method"]
    cfg["method"] = "lora"
    named_only, _ = trained({**cfg, "output_dir": str(tmp_path / "named-only")})
    assert yaml.safe_load((named_only / "train_config.yaml").read_text())["method"] == parent_method
    assert parent_method["r"] == 4 and json.loads((named_only / "adapter_config.json").read_text())["r"] == 4

    # A grandchild's lineage is the whole chain, oldest first.
    grand, _ = trained({**cfg, "continue_from": str(child), "output_dir": str(tmp_path / "grand")})
    chain = json.loads((grand / "run.json").read_text())["lineage"]
    assert [entry["path"] for entry in chain] == [str(parent.resolve()), str(child.resolve())]


def test_continued_full_run_starts_from_the_parents_weights(assets, tmp_path):
    first, _ = trained(config(assets, tmp_path / "full", method={"name": "full"}))
    cfg = config(assets, tmp_path / "again", method={"name": "full"}, continue_from=str(first))
    del cfg["model"]
    _, trainer = trained(cfg)
    saved = load_file(first / "model.safetensors")
    for name, value in saved.items():
        assert torch.equal(trainer.initial[name], value), name
    info = json.loads((tmp_path / "again" / "run.json").read_text())
    assert info["parent"]["method"] == "full" and info["base_model"] == str(first.resolve())


def test_continuing_needs_a_compatible_finished_run(assets, parent, tmp_path):
    with pytest.raises(ConfigError, match="trained a lora adapter; continuing it needs method.name: lora"):
        tunesmith.training.train(config(assets, tmp_path / "a", method={"name": "ia3"}, continue_from=str(parent)))
    with pytest.raises(ConfigError, match="method.r: 16 cannot apply: continue_from: .* trains its lora adapter "
                                          "further, made with r 4"):
        tunesmith.training.train(config(assets, tmp_path / "r", method={"name": "lora", "r": 16},
                                        continue_from=str(parent)))
    with pytest.raises(tunesmith.training.RunError, match="is not a finished tunesmith run"):
        tunesmith.training.train(config(assets, tmp_path / "b", continue_from=str(tmp_path)))
    with pytest.raises(ConfigError, match="set continue_from too"):
        load_config(config(assets, tmp_path / "c", regularization={"strength": 1.0}))


def records(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"{tag}{i}", "completion": "x"} for i in range(n)]


@pytest.mark.parametrize("fraction, n, k", [(0.2, 16, 4), (0.5, 10, 10), (0.25, 30, 10)])
def test_replay_mixes_exactly_the_configured_share_seeded(fraction, n, k, tmp_path):
    old = write_jsonl(tmp_path / "old.jsonl", records(50, "old"))
    cfg = load_config({"data": {"train": "new.jsonl"}, "replay": {"from": str(old), "fraction": fraction}})
    read = lambda path: [json.loads(line) for line in open(path)]  # noqa: E731
    mixed, info = mix_replay(cfg, records(n, "new"), read)
    assert mixed[:n] == records(n, "new") and len(mixed) == n + k
    assert info["count"] == k and info["fraction"] == pytest.approx(fraction) and info["pool"] == 50
    # Exactly random.Random(seed).sample of the pool: seeded by the run's seed, different under another seed.
    assert mixed[n:] == random.Random(cfg.seed).sample(records(50, "old"), k)
    again, _ = mix_replay(cfg, records(n, "new"), read)
    other, _ = mix_replay(cfg.model_copy(update={"seed": 7}), records(n, "new"), read)
    assert again == mixed and other[n:] != mixed[n:]
    counted, info = mix_replay(load_config({"data": {"train": "x"}, "replay": {"from": str(old), "count": 3}}),
                               records(n, "new"), read)
    assert len(counted) == n + 3 and info["count"] == 3


def test_replay_from_a_run_uses_the_data_it_recorded(assets, parent, tmp_path):
    cfg = config(assets, tmp_path / "r", method={"name": "lora", "r": 4}, continue_from=str(parent),
                 replay={"from": str(parent), "count": 5})
    del cfg["model"]
    run, trainer = trained(cfg)
    info = json.loads((run / "run.json").read_text())
    assert info["replay"]["files"] == [str(assets.chat.resolve())] and info["replay"]["count"] == 5
    assert len(trainer.train_dataset) == 16 + 5
    with pytest.raises(ConfigError, match="neither a data file nor a finished tunesmith run"):
        tunesmith.training.train({**cfg, "output_dir": str(tmp_path / "s"), "replay": {"from": str(tmp_path / "no"),
                                                                                        "count": 1}})


def test_l2sp_and_ewc_penalties_equal_hand_computed_values():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    anchor = Anchor(model, strength=0.5)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(5.0)  # frozen: no pull on it
    assert anchor.names == ["weight"]
    assert anchor.penalty(model).item() == pytest.approx(0.5 * 6 * 1.0)
    fisher = {"weight": torch.arange(6.0).reshape(2, 3)}
    ewc = Anchor(model, strength=2.0, importance=fisher)
    assert ewc.penalty(model).item() == 0.0  # the anchor is where the weights were when it was made
    with torch.no_grad():
        model.weight.copy_(before + 0.5)  # 0.5 below the EWC anchor: each term F * 0.25
    assert ewc.penalty(model).item() == pytest.approx(2.0 * 0.25 * fisher["weight"].sum().item())


def test_fisher_is_the_mean_squared_gradient_of_single_examples():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(2))

        def forward(self, x, y):
            return type("Out", (), {"loss": ((self.w * x).sum() - y) ** 2})()

    model = Tiny()
    features = [{"x": torch.tensor([1.0, 2.0]), "y": torch.tensor(0.5)},
                {"x": torch.tensor([-1.0, 0.5]), "y": torch.tensor(2.0)}]
    collate = lambda batch: {k: batch[0][k] for k in batch[0]}  # noqa: E731
    fisher = fisher_diagonal(model, features, collate, samples=10, seed=0)
    expected = torch.zeros(2)
    for f in features:  # d/dw (w.x - y)^2 = 2 (w.x - y) x
        expected += (2 * ((model.w.detach() * f["x"]).sum() - f["y"]) * f["x"]) ** 2 / 2
    assert torch.allclose(fisher["w"], expected)


def test_regularization_holds_the_weights_near_the_parent(assets, parent, tmp_path):
    moved = {}
    for name, reg in (("free", None), ("held", {"kind": "l2sp", "strength": 1e4})):
        cfg = config(assets, tmp_path / name, method={"name": "lora", "r": 4}, continue_from=str(parent),
                     **({"regularization": reg} if reg else {}))
        del cfg["model"]
        run, _ = trained(cfg)
        start, end = adapter_weights(parent), adapter_weights(run)
        moved[name] = sum(float((end[k] - start[k]).pow(2).sum()) for k in start)
    assert moved["held"] < moved["free"] / 10


def sequence(assets, tmp_path) -> dict:
    """Two tiny sft tasks and three strategies, two optimizer steps each."""
    doubles = write_jsonl(tmp_path / "b.jsonl", [{"messages": [
        {"role": "user", "content": f"Double {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]} for i in range(8)])
    return {"base": {"model": str(assets.lm), "method": {"name": "lora", "r": 4}, "max_steps": 2, "batch_size": 4,
                     "learning_rate": 1e-2, "save_steps": 100, "eval_max_new_tokens": 4, "logging_steps": 1},
            "tasks": [{"name": "sums", "train": str(assets.chat), "eval": str(assets.chat)},
                      {"name": "doubles", "train": str(doubles), "eval": str(doubles)}],
            "strategies": [{"name": "naive"}, {"name": "replay", "overrides": {"replay": {"fraction": 0.5}}},
                           {"name": "adapters", "kind": "adapters"}],
            "output_dir": str(tmp_path / "cl"), "probe_max_new_tokens": 4}


class PowerCut(Exception):
    pass


def test_continual_resumes_without_redoing_finished_steps(assets, tmp_path, monkeypatch):
    from tunesmith.continual import run

    real, calls, cut = tunesmith.training.train, [], [True]

    def counting(cfg, **kwargs):
        calls.append(cfg.output_dir)
        if cut[0] and len(calls) == 3:  # replay's second step (its first is naive's): as if the machine went down
            raise PowerCut
        return real(cfg, **kwargs)

    monkeypatch.setattr(tunesmith.training, "train", counting)
    seq = sequence(assets, tmp_path)
    with pytest.raises(PowerCut):
        run(seq, log=lambda *_: None)
    out = tmp_path / "cl"
    naive = sorted(p.name for p in (out / "naive").iterdir())
    assert naive == ["1-sums", "2-doubles"]
    stamp = (out / "naive" / "2-doubles" / "scores.json").stat().st_mtime_ns

    calls.clear()
    cut[0] = False
    report = run(seq, log=lambda *_: None)
    # Only what had not finished trains again; every strategy's first step is naive's (the same training).
    assert [c.split("/cl/")[1] for c in calls] == ["replay/2-doubles/run", "adapters/2-doubles/run"]
    assert (out / "naive" / "2-doubles" / "scores.json").stat().st_mtime_ns == stamp

    def info(strategy, step):
        return runs.open_run(out / strategy / step / "run")

    assert info("naive", "2-doubles").parent["path"] == str((out / "naive" / "1-sums" / "run").resolve())
    replay = info("replay", "2-doubles").replay
    assert replay["count"] == 8 and replay["fraction"] == 0.5 and replay["files"] == [str(assets.chat.resolve())]
    assert info("adapters", "2-doubles").parent is None and not (out / "replay" / "1-sums" / "run").exists()
    first = json.loads((out / "replay" / "1-sums" / "scores.json").read_text())
    assert first["run"] == str(out / "naive" / "1-sums" / "run")
    assert replay["files"] == [str(assets.chat.resolve())]  # replayed from naive's first run's recorded data

    for name, s in report["strategies"].items():
        assert len(s["matrix"]) == 2 and all(len(row) == 2 for row in s["matrix"]), name
        assert len(s["base"]) == 2 and len(s["probe"]) == 3
        assert set(s["summary"]) >= {"average_score", "average_forgetting", "backward_transfer", "forward_transfer"}
    # Per-task adapters answer task 1 with its own adapter after step 2: the score it had after step 1.
    adapters = report["strategies"]["adapters"]["matrix"]
    assert adapters[1][0] == adapters[0][0]
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "report.html", "base.json"}


def test_an_unknown_metric_is_a_sentence_naming_the_choices(assets, tmp_path):
    from tunesmith.continual import run

    with pytest.raises(ConfigError, match=r"metric: 'bleuu' is not a score of task sft; choose one of .*'bleu'"):
        run({**sequence(assets, tmp_path), "metric": "bleuu"}, log=lambda *_: None)


def test_each_score_is_the_one_its_run_reports_for_the_same_data(assets, tmp_path):
    """The matrix's diagonal and the step's own run score the same data the same way, also for a task whose file
    is in completion format and is learned as chat (sft_format: chat): the continual scorer must convert it as
    training does (it once scored such a task as raw text, under the chat-trained model's real score)."""
    import json

    from tunesmith.continual import run

    doubles = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"Double {i}?", "completion": f" {2 * i}"}
                                                 for i in range(8)])
    cfg = sequence(assets, tmp_path)
    cfg["base"]["data"] = {"sft_format": "chat"}
    cfg["tasks"][1].update(train=str(doubles), eval=str(doubles))
    cfg.update(strategies=[{"name": "naive"}], metric="loss")
    run(cfg, log=lambda *_: None)
    for i, step in enumerate(["1-sums", "2-doubles"]):
        row = json.loads((tmp_path / "cl" / "naive" / step / "scores.json").read_text())["row"]
        after = json.loads((tmp_path / "cl" / "naive" / step / "run" / "metrics.json").read_text())["after"]
        assert row[i] == pytest.approx(after["loss"], rel=1e-6), step

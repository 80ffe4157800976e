"""report_to: the config's shorthand, the missing package's one sentence, the Trainer's arguments, the summary
sent after training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.config import ConfigError, load_config
from tunesmith.training import tracking
from tunesmith.training.loop import _training_args

DATA = {"train": "unused.jsonl"}


@pytest.mark.parametrize("value, expected", [("tensorboard", ["tensorboard"]), (["mlflow", "wandb"],
                                             ["mlflow", "wandb"]), ("none", []), (None, [])])
def test_report_to_takes_one_name_or_a_list(value, expected):
    assert load_config({"data": DATA, "report_to": value}).report_to == expected
    assert load_config({"data": DATA}).report_to == []


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match=r"report_to\.0: Input should be 'tensorboard', 'mlflow' or 'wandb'"):
        load_config({"data": DATA, "report_to": "comet"})


@pytest.mark.parametrize("tracker", [t for t in tracking.PACKAGES if importlib.util.find_spec(t) is None])
def test_a_missing_tracker_package_is_one_sentence(tracker, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train: {tmp_path / 'none.jsonl'}}}\nreport_to: {tracker}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(config)]) != 0
    assert capsys.readouterr().err.strip() == (f"tunesmith: error: report_to: {tracker} needs the {tracker} "
                                               f"package: pip install {tracker}")


def test_the_trainer_gets_the_trackers_and_the_run_name(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    cfg = load_config({"data": DATA, "output_dir": str(tmp_path / "my-run"), "learning_rate": 1e-4, "epochs": 1,
                       "warmup_ratio": 0.1})
    args = _training_args(cfg, tmp_path / "my-run" / "checkpoints", has_eval=False)
    assert args.report_to == [] and args.run_name == "my-run"
    cfg = cfg.model_copy(update={"run_name": "named"})
    assert _training_args(cfg, tmp_path / "my-run" / "checkpoints", has_eval=False).run_name == "named"


def test_environment_points_tensorboard_at_the_run_and_keeps_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.environment(["tensorboard", "wandb"], tmp_path) == {
        "TENSORBOARD_LOGGING_DIR": str(tmp_path / "tensorboard"), "WANDB_MODE": "offline"}
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.environment(["wandb"], tmp_path) == {"WANDB_MODE": "online"}
    assert tracking.environment([], tmp_path) == {}


def test_the_summary_is_before_and_after_numbers_and_the_defaults_reasons():
    metrics = {"before": {"accuracy": 0.25, "before_kind": "untrained head"}, "train": {"train_loss": 1.0},
               "after": {"accuracy": 0.75, "bleu": 3}}
    reasons = {"learning_rate": "learning_rate 2e-4: lora on a small model"}
    assert tracking.summary(metrics, reasons) == {
        "before/accuracy": 0.25, "after/accuracy": 0.75, "after/bleu": 3,
        "defaults/learning_rate": "learning_rate 2e-4: lora on a small model"}




def tiny_run(tmp_path, bpe, tracker: str):
    """Four logged LoRA steps of a tiny random Llama, scored before and after, reported to `tracker`."""
    from conftest import SMOLLM2_TEMPLATE, _wrap, build_tiny_llama

    from tunesmith.training import train

    tokenizer = _wrap(bpe, eos_token="<|im_end|>", bos_token="<|im_start|>", chat_template=SMOLLM2_TEMPLATE)
    build_tiny_llama(tokenizer).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                                                     {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n"
                            for i in range(16)))
    return train({"model": str(tmp_path / "lm"), "data": {"train": str(data)}, "method": "lora",
                  "output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4, "logging_steps": 1,
                  "learning_rate": 1e-3, "eval_max_new_tokens": 4, "report_to": tracker}).path


def logged_losses(run) -> dict[int, float]:
    from tunesmith import runs

    return {e["step"]: e["loss"] for e in map(json.loads, (run / runs.LOG).read_text().splitlines()) if "loss" in e}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (tunesmith does not depend on it)")
def test_tensorboard_loss_scalars_equal_log_jsonl(tmp_path, bpe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tunesmith import runs

    run = tiny_run(tmp_path, bpe, "tensorboard")

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    logged = logged_losses(run)
    assert len(logged) == 4
    assert {s.step: s.value for s in events.Scalars("train/loss")} == pytest.approx(logged, rel=1e-6)
    metrics = runs.read_metrics(run)
    assert events.Scalars("train/before/loss")[0].value == pytest.approx(metrics["before"]["loss"])
    assert events.Scalars("train/after/loss")[0].value == pytest.approx(metrics["after"]["loss"])
    texts = events.Tags()["tensors"]
    assert "train/defaults/epochs/text_summary" in texts  # chosen by defaults.py: its reason is logged
    assert "train/defaults/learning_rate/text_summary" not in texts  # set in the config: no reason to log


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow is not installed (tunesmith does not depend on it)")
def test_an_mlflow_file_store_records_the_run(tmp_path, bpe, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tunesmith import runs

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 prefers a database; a folder needs no server
    run = tiny_run(tmp_path, bpe, "mlflow")

    client = MlflowClient(store)
    (recorded,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert recorded.info.run_name == "run" and recorded.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(recorded.info.run_id, "loss")] == pytest.approx(
        list(logged_losses(run).values()), rel=1e-6)
    metrics = runs.read_metrics(run)
    assert recorded.data.metrics["after/loss"] == pytest.approx(metrics["after"]["loss"])
    assert recorded.data.metrics["before/loss"] == pytest.approx(metrics["before"]["loss"])
    assert recorded.data.params["learning_rate"] == "0.001"
    reasons = json.loads((Path(client.download_artifacts(recorded.info.run_id, "defaults.json"))).read_text())
    assert set(reasons) == {f"defaults/{k}" for k in json.loads((run / runs.RUN_INFO).read_text())["defaults"]}

"""Every command, given a bad input, prints one `tunesmith: error:` sentence and exits non-zero; never a
traceback. In-process through main(argv) (an uncaught exception fails the test), plus the installed command
in a subprocess for the exit path a user really sees."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tunesmith.cli import main

CHAT = {"messages": [{"role": "user", "content": "Where is my order?"},
                     {"role": "assistant", "content": "It ships tomorrow."}]}


@pytest.fixture
def files(tmp_path, model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(8)))
    base = {"model": str(model_dir), "data": {"train": str(data), "eval_fraction": 0}, "max_steps": 2,
            "batch_size": 2, "evaluate_before": False, "save_steps": 100}

    def config(name, **overrides):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**base, "output_dir": str(tmp_path / "runs" / name), **overrides}))
        return str(path)

    prompting = tmp_path / "prompting.yaml"
    prompting.write_text("template: '{{ text }}'\nshotz: 2\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    entry_fails = tmp_path / "compare.yaml"
    entry_fails.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "cmp"), "base": {k: v for k, v in base.items() if k != "output_dir"},
        "entries": [{"name": "freeze-nothing", "overrides": {"method": {"name": "freeze", "train_layers": 0,
                                                                        "train_head": False}}}]}))
    return {"data": str(data), "model": str(model_dir), "config": config, "prompting": str(prompting),
            "file": str(a_file), "compare": str(entry_fails), "missing": str(tmp_path / "missing.jsonl")}


CASES = {
    "validate unknown format": lambda f: ["data", "validate", "--format", "nope", f["data"]],
    "validate missing file": lambda f: ["data", "validate", f["missing"]],
    "convert missing file": lambda f: ["data", "convert", f["missing"], "--to", "chat", "-o", f["missing"] + ".out"],
    "preview unknown model": lambda f: ["data", "preview", f["data"], "--model", f["missing"]],
    "generate bad messages": lambda f: ["generate", "--model", f["model"], "--messages", "[{not json"],
    "generate no prompt": lambda f: ["generate", "--model", f["model"]],
    "generate deeply nested messages": lambda f: ["generate", "--model", f["model"], "--messages", "[" * 100_000],
    "train missing config": lambda f: ["train", f["missing"]],
    "train typo": lambda f: ["train", f["config"]("typo", learning_rat=0.1)],
    "train freeze trains nothing": lambda f: ["train", f["config"](
        "freeze", method={"name": "freeze", "train_layers": 0, "train_head": False})],
    "train impossible adalora": lambda f: ["train", f["config"](
        "adalora", method={"name": "adalora", "tinit": 5, "tfinal": 5})],
    "train output_dir is a file": lambda f: ["train", f["config"]("file")] + [f"output_dir={f['file']}"],
    "export missing run": lambda f: ["export", f["missing"], "-o", f["missing"] + ".out"],
    "eval shots without train data": lambda f: ["eval", "--model", f["model"], "--data", f["data"], "--shots", "5"],
    "eval prompting typo": lambda f: ["eval", "--model", f["model"], "--data", f["data"], "--prompting",
                                      f["prompting"]],
    "eval missing data": lambda f: ["eval", "--model", f["model"], "--data", f["missing"]],
    "compare missing config": lambda f: ["compare", f["missing"]],
    "compare failing entry": lambda f: ["compare", f["compare"]],
    "serve missing adapter": lambda f: ["serve", "--model", f["model"], "--adapter", f["missing"]],
    "chat unknown model": lambda f: ["chat", "--model", f["missing"]],
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_sentence_and_a_nonzero_exit(case, files, capsys):
    code = main(CASES[case](files))
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("tunesmith: error:")]
    assert lines, err


def test_specific_messages_name_what_to_fix(files, capsys):
    main(CASES["eval prompting typo"](files))
    assert f"{files['prompting']}:2: shotz: unknown key; did you mean 'shots'?" in capsys.readouterr().err
    main(CASES["eval shots without train data"](files))
    assert "--shots 5 needs --train-data" in capsys.readouterr().err
    main(CASES["validate unknown format"](files))
    assert "unknown format 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["one record, eval split", "empty train file", "empty eval file",
                                  "every record too long"])
def test_data_that_leaves_training_or_evaluation_nothing_is_a_sentence_naming_the_file_and_the_fix(
        case, files, tmp_path, capsys):
    """A new user's first try: a one-record file, whose only record the default eval split took (an IndexError
    before), or a file left empty, or max_length below every example (a run that trained zero steps before)."""
    one, empty = tmp_path / "one.jsonl", tmp_path / "empty.jsonl"
    one.write_text(json.dumps(CHAT) + "\n")
    empty.write_text("")
    config, expected = {
        "one record, eval split": (
            files["config"]("one", data={"train": str(one)}),
            f"{one}: holds 1 record, and data.eval_fraction 0.1 holds out 1 for evaluation, leaving none to train "
            "on; add records, set data.eval_fraction: 0, or give data.eval a file"),
        "empty train file": (
            files["config"]("empty-train", data={"train": str(empty)}),
            f"{empty}: holds no records to train on; add records to it"),
        "empty eval file": (
            files["config"]("empty-eval", data={"train": files["data"], "eval": str(empty)}),
            f"{empty}: holds no records to evaluate on; add records to it, or leave data.eval unset to hold out "
            "data.eval_fraction of the training data"),
        "every record too long": (
            files["config"]("short", max_length=4),
            f"{files['data']}: none of its 8 examples keeps a learnable token once truncated to max_length 4, so "
            "there is nothing to train on; raise max_length or shorten the examples"),
    }[case]
    code = main(["train", config])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("tunesmith: error:")] == [
        f"tunesmith: error: {expected}"]


def test_validate_prints_warnings_for_empty_system_content(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": ""}, *CHAT["messages"]]}) + "\n")
    assert main(["data", "validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert f"{path}:1: messages[0].content: empty system content" in captured.err
    assert "ok, 1 chat records" in captured.out


def test_the_installed_command_prints_no_traceback(files):
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "data", "validate", "--format", "nope", files["data"]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "tunesmith: error:" in proc.stderr

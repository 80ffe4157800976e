"""The CLI end to end through main(argv): exit codes, error text, files written or not."""

from __future__ import annotations

import json


from tunesmith.cli import main

GOOD = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "The capital of France is Paris."}]}


def write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" if not isinstance(x, str) else x + "\n" for x in lines))
    return path


def test_validate_ok_and_bad_files(tmp_path, capsys):
    good = write(tmp_path / "good.jsonl", [GOOD, GOOD])
    bad = write(tmp_path / "bad.jsonl", [GOOD, {"messages": [{"role": "bot", "content": "x"}]}, "{not json"])
    assert main(["data", "validate", str(good)]) == 0
    assert "good.jsonl: ok, 2 chat records (openai-chat)" in capsys.readouterr().out
    assert main(["data", "validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: messages[0].role: unknown role 'bot'" in err
    assert f"{bad}:3:" in err and "invalid JSON" in err


def test_convert_writes_nothing_when_any_record_is_bad(tmp_path, capsys):
    bad = write(tmp_path / "bad.jsonl", [GOOD, {"messages": []}])
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(bad), "--to", "completion", "-o", str(out)]) == 1
    assert not out.exists()
    assert f"{bad}:2: messages" in capsys.readouterr().err


def test_convert_refuses_to_overwrite_without_force(tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", [GOOD])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    assert main(["data", "convert", str(src), "--to", "completion", "-o", str(out)]) == 1
    assert out.read_text() == "precious\n" and "--force" in capsys.readouterr().err
    assert main(["data", "convert", str(src), "--to", "completion", "-o", str(out), "--force"]) == 0
    assert json.loads(out.read_text()) == {"prompt": "What is the capital of France?",
                                           "completion": "The capital of France is Paris."}


def test_preview_marks_exactly_the_learnable_text(tmp_path, model_dir, capsys):
    src = write(tmp_path / "chat.jsonl", [GOOD])
    assert main(["data", "preview", str(src), "--model", str(model_dir), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "assistant\n⟦The capital of France is Paris.<|im_end|>⟧\n" in out
    assert out.count("⟦") == 1 and "1 examples" in out


def test_preview_renders_with_the_template_kwargs_given(tmp_path, model_dir, capsys):
    """--chat-template-kwargs reaches the template as data.chat_template_kwargs does in training."""
    template = ("{% if mood is defined %}[{{ mood }}]\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}"
                "\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    src = write(tmp_path / "chat.jsonl", [GOOD])
    argv = ["data", "preview", str(src), "--model", str(model_dir), "--no-color", "--chat-template", template]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--chat-template-kwargs", '{"mood": "calm"}']) == 0
    calm = capsys.readouterr().out
    assert "[calm]" not in plain and "── example 1" in plain
    assert "[calm]\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in calm
    assert main([*argv, "--chat-template-kwargs", "[1]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_preview_reports_truncation(tmp_path, model_dir, capsys):
    src = write(tmp_path / "chat.jsonl", [GOOD, GOOD])
    assert main(["data", "preview", str(src), "--model", str(model_dir), "--max-length", "10"]) == 0
    assert "max_length=10: 2 truncated, 2 dropped" in capsys.readouterr().out


def test_preview_of_completion_data_marks_the_appended_eos(tmp_path, model_dir, capsys):
    src = write(tmp_path / "c.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    assert main(["data", "preview", str(src), "--model", str(model_dir), "--no-color"]) == 0
    assert "Q: 2+2?\nA:⟦ 4⟧⟦<eos>⟧" in capsys.readouterr().out


def test_generate_with_a_local_model_directory(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "3",
                 "--no-stream"]) == 0
    assert "finish_reason=" in capsys.readouterr().err


def test_generate_rejects_bad_messages(model_dir, capsys, tmp_path):
    assert main(["generate", "--model", str(model_dir), "--messages", "[{oops"]) == 2
    assert "--messages: not valid JSON" in capsys.readouterr().err
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    assert main(["generate", "--model", str(model_dir), "--messages", str(path), "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--model", str(model_dir)]) == 2


def test_missing_input_file_is_a_sentence_not_a_traceback(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl: no such file" in capsys.readouterr().err


def test_preview_refuses_classification_data(tmp_path, model_dir, capsys):
    src = tmp_path / "cls.csv"
    src.write_text("text,label\ngreat,positive\n")
    assert main(["data", "preview", str(src), "--model", str(model_dir)]) == 2
    assert "classification records" in capsys.readouterr().err


def test_train_prints_the_before_after_table_and_how_to_chat_and_serve(tmp_path, model_dir, capsys):
    import yaml

    data = write(tmp_path / "chat.jsonl", [GOOD] * 8)
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model_dir), "data": {"train": str(data), "eval_fraction": 0.25}, "output_dir": str(run),
        "max_steps": 2, "batch_size": 2, "save_steps": 100, "eval_max_new_tokens": 2}))
    assert main(["train", str(config)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert any(line.split()[:3] == ["metric", "before", "after"] for line in lines)
    assert "chat with it:  " in captured.out and f" chat --model {run}\n" in captured.out
    assert f" serve --model {model_dir} --adapter run={run}\n" in captured.out
    # progress goes to stderr from the first phase on: scoring the base model before training
    assert "before (base model): 2 held-out: generating 0/2 examples" in captured.err

"""`tunesmith chat`: the REPL driven with scripted input."""

from __future__ import annotations

import io
import json

import pytest

from tunesmith.cli.chat import chat_repl


def test_repl_commands_history_and_save(tiny_lm, chatml_tokenizer, tmp_path):
    from tunesmith.generation import SamplingParams

    out = tmp_path / "chat.jsonl"
    script = "\n".join(["Hello", "What is 2+2?", f"/save {out}", "/reset", "/system Be brief.", "Hi",
                        f"/save {out}", "/nope", "/exit", "never read"]) + "\n"
    stdout = io.StringIO()
    final = chat_repl(tiny_lm, chatml_tokenizer, params=SamplingParams(max_new_tokens=4), stdin=io.StringIO(script),
                      stdout=stdout)
    saved = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    assert [m["role"] for m in saved[0]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in saved[0][::2]] == ["Hello", "What is 2+2?"]
    assert [m["role"] for m in saved[1]] == ["system", "user", "assistant"] and saved[1][0]["content"] == "Be brief."
    assert final == saved[1]
    assert saved[0][1]["content"] in stdout.getvalue()  # the reply was printed (streamed)
    assert "unknown command /nope" in stdout.getvalue()


def test_repl_ends_at_end_of_input(tiny_lm, chatml_tokenizer):
    assert chat_repl(tiny_lm, chatml_tokenizer, stdin=io.StringIO(""), stdout=io.StringIO()) == []


def test_saved_conversation_is_valid_training_data(tiny_lm, chatml_tokenizer, tmp_path):
    from tunesmith.data.formats import validate
    from tunesmith.generation import SamplingParams

    out = tmp_path / "c.jsonl"
    chat_repl(tiny_lm, chatml_tokenizer, params=SamplingParams(max_new_tokens=3),
              stdin=io.StringIO(f"Hi\n/save {out}\n"), stdout=io.StringIO())
    report = validate(str(out))
    assert not report.problems and report.kind == "chat"


def test_cli_chat_and_serve_arguments(bpe, tmp_path, monkeypatch, capsys):
    import sys

    from serve_assets import write_base

    from tunesmith.cli import main
    from tunesmith.serve import ServeError, parse_adapters

    base = write_base(bpe, tmp_path / "base")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/exit\n"))
    assert main(["chat", "--model", str(base), "--max-new-tokens", "3", "--system", "Be brief.", "--device", "cpu",
                 "--temperature", "0.7", "--top-k", "20", "--seed", "1", "--stop", "\n"]) == 0
    assert "/reset" in capsys.readouterr().out
    assert main(["chat", "--model", str(base), "--top-p", "0"]) == 2
    assert "top_p 0.0 must be in (0, 1]" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["chat", "--model", str(base), "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert parse_adapters(["a=runs/x", "runs/y"]) == {"a": "runs/x", "y": "runs/y"}
    with pytest.raises(ServeError, match="'a' is given twice"):
        parse_adapters(["a=r1", "a=r2"])
    assert main(["serve", "--model", str(base), "--adapter", f"x={tmp_path}"]) == 1
    assert "is not a finished tunesmith run" in capsys.readouterr().err

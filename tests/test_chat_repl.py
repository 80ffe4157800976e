"""`tunesmith chat`: the REPL driven with scripted input, with and without tools."""

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


# ---------------------------------------------------------------------------------------------------------
# --tools: calls shown as calls, answered with /result
# ---------------------------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "lookup_order", "description": "Find an order.",
                                           "parameters": {"type": "object",
                                                          "properties": {"order_id": {"type": "string"}}}}}]


def test_repl_with_tools_shows_calls_and_takes_their_results(tiny_lm, chatml_tokenizer, tmp_path):
    from test_generate import saying

    from tunesmith.data.tokenize import tokenize_record
    from tunesmith.data.tools import format_call

    calls = format_call("lookup_order", {"order_id": "42"}) + "\n" + format_call("lookup_order", {"order_id": "43"})
    params = saying(tiny_lm, chatml_tokenizer, calls, "42 has shipped; 43 is late.")
    out = tmp_path / "tools.jsonl"
    script = "\n".join(["/result too early", "Where are orders 42 and 43?", "And 44?", "/result shipped",
                        "/result late", f"/save {out}", "/exit"]) + "\n"
    stdout = io.StringIO()
    final = chat_repl(tiny_lm, chatml_tokenizer, params=params, tools=TOOLS, stdin=io.StringIO(script),
                      stdout=stdout)
    shown = stdout.getvalue()
    assert shown.startswith("commands: /reset, /system TEXT, /save FILE, /exit, /result TEXT (answer the model's "
                            "tool call)\n> (no tool call to answer)\n> ")
    assert ('> call lookup_order({"order_id": "42"})\ncall lookup_order({"order_id": "43"})\n'
            "(answer with /result TEXT, once per call, in order)\n"
            "> (the model called a tool: answer with /result TEXT, or /reset)\n"
            "> > 42 has shipped; 43 is late.\n") in shown
    assert "<tool_call>" not in shown  # a call is never shown as markup
    assert [m["role"] for m in final] == ["user", "assistant", "tool", "tool", "assistant"]
    ids = [c["id"] for c in final[1]["tool_calls"]]
    assert final[1]["content"] is None and len(set(ids)) == 2
    assert [(m["tool_call_id"], m["content"]) for m in final[2:4]] == [(ids[0], "shipped"), (ids[1], "late")]
    assert final[4] == {"role": "assistant", "content": "42 has shipped; 43 is late."}
    (saved,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert saved == {"messages": final, "tools": TOOLS}
    # What the session saved trains: the calls learnable exactly as the model said them.
    example = tokenize_record(chatml_tokenizer, saved)
    learned = chatml_tokenizer.decode([label for label in example.labels if label != -100])
    assert learned == f"{calls}<|im_end|>42 has shipped; 43 is late.<|im_end|>"


def test_result_is_no_command_without_tools(tiny_lm, chatml_tokenizer):
    stdout = io.StringIO()
    chat_repl(tiny_lm, chatml_tokenizer, stdin=io.StringIO("/result x\n"), stdout=stdout)
    assert "unknown command /result" in stdout.getvalue()


def test_cli_chat_tools_file(bpe, tmp_path, monkeypatch, capsys):
    import sys

    from serve_assets import write_base

    from tunesmith.cli import main

    base = write_base(bpe, tmp_path / "base")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/exit\n"))
    assert main(["chat", "--model", str(base), "--max-new-tokens", "3", "--tools", str(tools)]) == 0
    assert "/result TEXT" in capsys.readouterr().out
    for content, error in [("{", "not valid JSON (Expecting property name enclosed in double quotes at line 1"),
                           ('{"tools": []}', "must hold a JSON list of tool definitions"),
                           ('[{"type": "function", "function": {"description": "x"}}]', "tool 0 has no function name")]:
        tools.write_text(content)
        assert main(["chat", "--model", str(base), "--tools", str(tools)]) == 2
        assert f"--tools {tools}: {error}" in capsys.readouterr().err
    assert main(["chat", "--model", str(base), "--tools", str(tmp_path / "none.json")]) == 2
    assert "cannot be read (No such file or directory)" in capsys.readouterr().err



# ---------------------------------------------------------------------------------------------------------
# --feedback: /good, /bad and /edit TEXT keep the last reply as training records
# ---------------------------------------------------------------------------------------------------------

def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_repl_feedback_keeps_exactly_the_records_of_each_gesture(tiny_lm, chatml_tokenizer, tmp_path):
    from test_generate import saying

    params = saying(tiny_lm, chatml_tokenizer, "Paris.", "4", "It is 4.")
    fb = tmp_path / "feedback"
    script = "\n".join(["/good", "What is the capital of France?", "/good", "/bad", "/edit", "/edit Paris.",
                        "/edit It is Paris.", "/good", "What is 2+2?", "/bad", "/reset", "Hi", "/bad"]) + "\n"
    stdout = io.StringIO()
    final = chat_repl(tiny_lm, chatml_tokenizer, params=params, system="Be brief.", stdin=io.StringIO(script),
                      stdout=stdout, feedback=fb)
    shown = stdout.getvalue()
    assert shown.startswith("commands: /reset, /system TEXT, /save FILE, /exit, /good, /bad, /edit TEXT (feedback "
                            "on the last reply)\n> (no reply yet to give feedback on)\n> Paris.\n")
    assert (f"> (kept in {fb}: kto.jsonl)\n> (this reply is judged already)\n"
            "> usage: /edit TEXT (the last reply as it should have been)\n"
            "> (the corrected reply is the same as the original: nothing to learn)\n"
            f"> (kept in {fb}: sft.jsonl, preference.jsonl)\n"
            f"> (kept in {fb}: kto.jsonl)\n") in shown  # a corrected reply may be judged again
    system, q1, q2 = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital "
                      "of France?"}, {"role": "user", "content": "What is 2+2?"})
    said = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    assert _records(fb / "kto.jsonl") == [
        {"prompt": [system, q1], "completion": said("Paris."), "label": True},
        {"prompt": [system, q1], "completion": said("It is Paris."), "label": True},
        {"prompt": [system, q1, *said("It is Paris."), q2], "completion": said("4"), "label": False},
        {"prompt": [system, {"role": "user", "content": "Hi"}], "completion": said("It is 4."), "label": False}]
    assert _records(fb / "sft.jsonl") == [{"messages": [system, q1, *said("It is Paris.")]}]
    assert _records(fb / "preference.jsonl") == [{"prompt": [system, q1], "chosen": said("It is Paris."),
                                                  "rejected": said("Paris.")}]
    assert final == [system, {"role": "user", "content": "Hi"}, *said("It is 4.")]


def test_repl_feedback_commands_say_how_to_turn_them_on(tiny_lm, chatml_tokenizer):
    stdout = io.StringIO()
    chat_repl(tiny_lm, chatml_tokenizer, stdin=io.StringIO("/good\n/edit better\n"), stdout=stdout)
    assert stdout.getvalue() == ("commands: /reset, /system TEXT, /save FILE, /exit\n"
                                 "> (/good keeps feedback as training data: start the chat with --feedback DIR)\n"
                                 "> (/edit keeps feedback as training data: start the chat with --feedback DIR)\n> \n")


def test_cli_chat_feedback_dir(bpe, tmp_path, monkeypatch, capsys):
    import sys

    from serve_assets import write_base

    from tunesmith.cli import main

    base = write_base(bpe, tmp_path / "base")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/bad\n/exit\n"))
    assert main(["chat", "--model", str(base), "--max-new-tokens", "3", "--temperature", "0",
                 "--feedback", str(tmp_path / "fb")]) == 0
    (record,) = _records(tmp_path / "fb" / "kto.jsonl")
    assert record["prompt"] == [{"role": "user", "content": "Hi"}] and record["label"] is False
    assert f"(kept in {tmp_path / 'fb'}: kto.jsonl)" in capsys.readouterr().out
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    assert main(["chat", "--model", str(base), "--tools", str(tools), "--feedback", str(tmp_path / "fb")]) == 2
    assert "--feedback keeps plain chat replies; it cannot be used with --tools" in capsys.readouterr().err
    assert main(["chat", "--model", str(base), "--feedback", str(tools)]) == 2
    assert f"--feedback {tools}: is a file; give a directory" in capsys.readouterr().err

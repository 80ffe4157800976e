"""`tunesmith chat`: a terminal conversation with a model or a trained run, streamed as it is generated.

Commands: `/reset` (forget the history, keep the system prompt), `/system TEXT` (set it and reset),
`/save FILE` (the conversation as one OpenAI chat JSONL record, ready to train on), `/exit`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

HELP = "commands: /reset, /system TEXT, /save FILE, /exit"


def chat_repl(model, tokenizer, *, params=None, system: str | None = None, chat_template: str | None = None,
              stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[dict]:
    """Run the REPL until /exit or end of input; returns the final conversation."""
    from ..generation import SamplingParams, stream

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    params = params or SamplingParams(max_new_tokens=256)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    print(HELP, file=stdout, flush=True)
    while True:
        print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            print(file=stdout)
            return messages
        line = line.rstrip("\n")
        command, _, arg = line.partition(" ")
        if command == "/exit":
            return messages
        if command == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(history cleared)", file=stdout)
        elif command == "/system":
            messages = [{"role": "system", "content": arg}] if arg.strip() else []
            print("(system prompt set; history cleared)" if arg.strip() else "(system prompt removed)", file=stdout)
        elif command == "/save":
            if not arg.strip():
                print("usage: /save FILE", file=stdout)
                continue
            path = Path(arg.strip())
            with path.open("a", encoding="utf-8") as f:  # append: one conversation per line, a training set
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            print(f"(saved {len(messages)} messages to {path})", file=stdout)
        elif command.startswith("/"):
            print(f"unknown command {command}; {HELP}", file=stdout)
        elif line.strip():
            messages.append({"role": "user", "content": line})
            pieces = []
            for piece in stream(model, tokenizer, messages=messages, params=params, chat_template=chat_template):
                pieces.append(piece)
                print(piece, end="", file=stdout, flush=True)
            print(file=stdout, flush=True)
            messages.append({"role": "assistant", "content": "".join(pieces)})

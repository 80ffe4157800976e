"""`tunesmith chat`: a terminal conversation with a model or a trained run, streamed as it is generated.

Commands: `/reset` (forget the history, keep the system prompt), `/system TEXT` (set it and reset),
`/save FILE` (the conversation as one OpenAI chat JSONL record, ready to train on), `/exit`.

With `--feedback DIR`, `/good` and `/bad` judge the last reply (a KTO record) and `/edit TEXT` corrects it (an SFT
record and a preference pair of the correction over the original; the conversation goes on from the correction),
kept in the same files and shapes as the web page's feedback (tunesmith/feedback.py).

With `--tools FILE` (a JSON list of OpenAI tool definitions) the model is prompted with them as training
rendered them (data/tools.py), each reply is shown once complete, and a reply that calls tools is shown as its
calls, `call NAME(ARGUMENTS)`. Answer each call with `/result TEXT` (a `tool` turn for the oldest unanswered
call); once every call of the turn has its result, the model replies. `/save` keeps the tools in the record.

A run is talked to with the chat template variables it trained with (run.json's `chat_template_kwargs`, e.g.
`enable_thinking: false`); a thinking model's reply streams with its <think> block, and the history keeps the
reasoning apart from the answer (`reasoning_content`), for the template to show or drop."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from ..errors import UsageError

HELP = "commands: /reset, /system TEXT, /save FILE, /exit"
TOOLS_HELP = ", /result TEXT (answer the model's tool call)"
FEEDBACK_HELP = ", /good, /bad, /edit TEXT (feedback on the last reply)"
FEEDBACK_COMMANDS = ("/good", "/bad", "/edit")


def load_tools(path: str) -> list[dict]:
    """--tools FILE: a JSON list of tool definitions (or an object with "tools"), OpenAI's `{"type": "function",
    "function": {"name", "description", "parameters"}}` or the bare function objects."""
    from ..data.jsonparse import parse_json
    from ..data.tools import function_of

    try:
        data = parse_json(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"--tools {path}: cannot be read ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--tools {path}: not valid JSON ({err.msg} at line {err.lineno}, "
                         f"column {err.colno})") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list) or not tools:
        raise UsageError(f'--tools {path}: must hold a JSON list of tool definitions ({{"type": "function", '
                         '"function": {"name": ..., "description": ..., "parameters": {...}}})')
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(function_of(tool).get("name"), str):
            raise UsageError(f"--tools {path}: tool {i} has no function name (a string at function.name)")
    return tools


def open_feedback(directory, tools: list[dict] | None = None):
    """--feedback DIR as the FeedbackLog /good, /bad and /edit write to (None without it); refused with --tools,
    whose calls the records could not carry."""
    from ..feedback import FeedbackError, FeedbackLog

    if directory is None or isinstance(directory, FeedbackLog):
        return directory
    if tools:
        raise UsageError("--feedback keeps plain chat replies; it cannot be used with --tools")
    try:
        return FeedbackLog(directory)
    except FeedbackError as err:  # a file where the directory should be: how the command was called
        raise UsageError(str(err)) from None


def recorded_kwargs(model: str) -> dict | None:
    """The chat template variables a run trained with (run.json), which talking to it applies by default; None
    for a model that is no run, or a run trained without any."""
    from .. import runs

    info = runs.find_run(model)
    return info.chat_template_kwargs if info else None


class _Chat:
    """One conversation: its messages, the calls still waiting for a result, and how it is shown."""

    def __init__(self, model, tokenizer, params, chat_template, tools, system, stdout, chat_template_kwargs=None,
                 feedback=None):
        self.model, self.tokenizer, self.params, self.chat_template = model, tokenizer, params, chat_template
        self.tools, self.out, self.kwargs, self.feedback = tools, stdout, chat_template_kwargs, feedback
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.waiting: list[str] = []  # ids of the last turn's calls without a result, oldest first
        self.thumbed: int | None = None  # len(messages) when the last reply got its /good or /bad

    def say(self, *text: str, end: str = "\n") -> None:
        print(*text, end=end, file=self.out, flush=True)

    def user(self, line: str) -> None:
        if self.waiting:
            self.say("(the model called a tool: answer with /result TEXT, or /reset)")
            return
        self.messages.append({"role": "user", "content": line})
        self.reply()

    def result(self, text: str) -> None:
        if not self.waiting:
            self.say("(no tool call to answer)")
            return
        self.messages.append({"role": "tool", "tool_call_id": self.waiting.pop(0), "content": text})
        if not self.waiting:
            self.reply()

    def reply(self) -> None:
        from ..generation import generate

        # Without tools the reply streams; with them it is shown once complete, so a call never shows as markup.
        on_text = None if self.tools else (lambda piece: self.say(piece, end=""))
        out = generate(self.model, self.tokenizer, messages=self.messages, params=self.params,
                       chat_template=self.chat_template, tools=self.tools, chat_template_kwargs=self.kwargs,
                       on_text=on_text)
        if not self.tools:  # streamed already
            self.say()
        elif out.content or not out.tool_calls:
            self.say(out.content or "")
        for call in out.tool_calls or ():
            self.say(f"call {call['function']['name']}({call['function']['arguments']})")
        if out.tool_calls:
            self.say("(answer with /result TEXT" + (", once per call, in order)" if len(out.tool_calls) > 1 else ")"))
            self.waiting = [call["id"] for call in out.tool_calls]
        self.messages.append(out.message)

    def save(self, arg: str) -> None:
        if not arg.strip():
            self.say("usage: /save FILE")
            return
        path = Path(arg.strip())
        record = {"messages": self.messages, **({"tools": self.tools} if self.tools else {})}
        with path.open("a", encoding="utf-8") as f:  # append: one conversation per line, a training set
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.say(f"(saved {len(self.messages)} messages to {path})")

    def judge(self, command: str, arg: str) -> None:
        """/good, /bad (a KTO record of the last reply) or /edit TEXT (the reply corrected to TEXT)."""
        from ..feedback import FeedbackError, edit, thumbs

        if self.feedback is None:
            self.say(f"({command} keeps feedback as training data: start the chat with --feedback DIR)")
            return
        if not self.messages or self.messages[-1]["role"] != "assistant":
            self.say("(no reply yet to give feedback on)")
            return
        if command == "/edit" and not arg.strip():
            self.say("usage: /edit TEXT (the last reply as it should have been)")
            return
        if command != "/edit" and self.thumbed == len(self.messages):
            self.say("(this reply is judged already)")
            return
        prompt, reply = self.messages[:-1], self.messages[-1]["content"]
        try:
            records = edit(prompt, reply, arg) if command == "/edit" else thumbs(prompt, reply, command == "/good")
        except FeedbackError as err:
            self.say(f"({err})")
            return
        kept = self.feedback.write(records)
        if command == "/edit":  # go on from the reply as it should have been
            self.messages[-1] = {"role": "assistant", "content": arg}
        self.thumbed = None if command == "/edit" else len(self.messages)
        self.say(f"(kept in {self.feedback.directory}: {', '.join(k['file'] for k in kept)})")

    def reset(self, system: str | None = None) -> None:
        """Forget the history; keep the system prompt, or set it to `system` ("": none)."""
        kept = [m for m in self.messages if m["role"] == "system"]
        self.messages = kept if system is None else ([{"role": "system", "content": system}] if system else [])
        self.waiting, self.thumbed = [], None


def chat_repl(model, tokenizer, *, params=None, system: str | None = None, chat_template: str | None = None,
              tools: list[dict] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
              chat_template_kwargs: dict | None = None, feedback=None) -> list[dict]:
    """Run the REPL until /exit or end of input; returns the final conversation. `chat_template_kwargs` render
    every prompt (a run's own: `recorded_kwargs`); `feedback` is the directory (or FeedbackLog) that /good, /bad
    and /edit write to."""
    from ..generation import SamplingParams

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    chat = _Chat(model, tokenizer, params or SamplingParams(max_new_tokens=256), chat_template, tools, system, stdout,
                 chat_template_kwargs, open_feedback(feedback, tools))
    help_line = HELP + (TOOLS_HELP if tools else "") + (FEEDBACK_HELP if feedback is not None else "")
    chat.say(help_line)
    while True:
        chat.say("> ", end="")
        line = stdin.readline()
        if not line:
            chat.say()
            return chat.messages
        line = line.rstrip("\n")
        command, _, arg = line.partition(" ")
        if command == "/exit":
            return chat.messages
        if command == "/reset":
            chat.reset()
            chat.say("(history cleared)")
        elif command == "/system":
            chat.reset(arg if arg.strip() else "")
            chat.say("(system prompt set; history cleared)" if arg.strip() else "(system prompt removed)")
        elif command == "/save":
            chat.save(arg)
        elif command == "/result" and tools:
            chat.result(arg)
        elif command in FEEDBACK_COMMANDS:
            chat.judge(command, arg)
        elif command.startswith("/"):
            chat.say(f"unknown command {command}; {help_line}")
        elif line.strip():
            chat.user(line)

"""`tunesmith generate`, `chat` and `serve`: talk to a model or a trained run, once, in the terminal, or over
the OpenAI-compatible HTTP API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UsageError
from ..serve.config import ServeConfig
from .common import add_fields, config_from_args, model_options, sampling, sampling_options


def _load_messages(value: str) -> list[dict]:
    """--messages takes a JSON list, a JSON object with "messages", or a path to a file holding either."""
    from ..data.jsonparse import parse_json

    path = Path(value)
    text = path.read_text(encoding="utf-8") if not value.lstrip().startswith(("[", "{")) and path.is_file() else value
    try:
        data = parse_json(text)
    except json.JSONDecodeError as err:
        where = str(path) if text is not value else "--messages"
        raise UsageError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise UsageError('--messages must be a list of {"role": ..., "content": ...} objects')
    return messages


def _load_placed(name: str, device: str):
    """(model, tokenizer) for generation, the model on `device` (--device)."""
    from ..generation.device import place
    from ..models import load

    model, tokenizer = load(name)
    return place(model, device), tokenizer


def cmd_generate(args) -> int:
    from ..generation import generate
    from .chat import recorded_kwargs

    if (args.prompt is None) == (args.messages is None):
        raise UsageError("give either --prompt TEXT (completion) or --messages JSON|FILE (chat)")
    messages = _load_messages(args.messages) if args.messages is not None else None
    if messages is not None and args.system:
        messages = [{"role": "system", "content": args.system}] + messages
    params = sampling(args)
    model, tokenizer = _load_placed(args.model, args.device)
    on_text = None if args.no_stream else (lambda piece: print(piece, end="", flush=True))
    result = generate(model, tokenizer, prompt=args.prompt, messages=messages, params=params,
                      chat_template=args.chat_template, chat_template_kwargs=recorded_kwargs(args.model),
                      on_text=on_text)
    print(result.text if args.no_stream else "")
    print(f"[{result.completion_tokens} tokens, finish_reason={result.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import chat_repl, load_tools, open_feedback, recorded_kwargs

    params = sampling(args)
    tools = load_tools(args.tools) if args.tools else None
    feedback = open_feedback(args.feedback, tools)  # refused before the model loads
    model, tokenizer = _load_placed(args.adapter or args.model, args.device)
    chat_repl(model, tokenizer, params=params, system=args.system, chat_template=args.chat_template, tools=tools,
              chat_template_kwargs=recorded_kwargs(args.adapter or args.model), feedback=feedback)
    return 0


def cmd_serve(args) -> int:
    from ..serve import run

    config = config_from_args(ServeConfig, args)
    print(f"tunesmith: loading {config.model} to serve it on http://{config.host}:{config.port}/v1 (web page: "
          f"http://{config.host}:{config.port}/)", file=sys.stderr, flush=True)
    run(config)
    return 0


def add_commands(sub) -> None:
    generating = [model_options("model", "chat_template", "device"), sampling_options(max_new_tokens=256)]

    p = sub.add_parser("generate", parents=generating, help="generate a completion or a chat reply")
    p.add_argument("--prompt", help="completion format: text to continue")
    p.add_argument("--messages", help="chat format: JSON list of messages, or a file holding it")
    p.add_argument("--system", help="prepend a system message (chat)")
    p.add_argument("--no-stream", action="store_true", help="print the reply only when complete")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", parents=generating, help="chat with a model or a trained run in the terminal")
    p.add_argument("--adapter", metavar="RUN", help="a trained run directory (its base model is loaded)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--tools", metavar="FILE", help="a JSON list of tool definitions the model may call; answer a "
                                                   "call with /result TEXT")
    p.add_argument("--feedback", metavar="DIR", help="keep /good, /bad and /edit TEXT on the last reply under DIR as "
                                                     "training data (kto.jsonl, sft.jsonl, preference.jsonl)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve the model and adapters over an OpenAI-compatible HTTP API")
    add_fields(p, ServeConfig)
    p.set_defaults(func=cmd_serve)

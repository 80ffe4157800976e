"""The `tunesmith` command: thin argument parsing over the Python API. `main(argv) -> int` so tests call it
directly."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import runs
from .errors import TunesmithError, UsageError


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------

def _read_options(args) -> dict:
    return {k: v for k, v in {"format": args.format, "text_column": args.text_column,
                              "label_column": args.label_column}.items() if v is not None}


def cmd_data_validate(args) -> int:
    from .data.formats import validate

    failed = 0
    for path in args.files:
        report = validate(path, **_read_options(args))
        for warning in report.warnings:
            print(f"{warning} (warning)", file=sys.stderr)
        if report.problems:
            failed += 1
            for problem in report.problems:
                print(problem, file=sys.stderr)
            print(f"{path}: {len(report.problems)} problem(s) in {report.format or 'unknown'} data",
                  file=sys.stderr)
        else:
            print(f"{path}: ok, {report.count} {report.kind} records ({report.format})")
    return 1 if failed else 0


def cmd_data_convert(args) -> int:
    from .data.formats import convert_file

    n = convert_file(args.input, args.output, to=args.to, force=args.force, **_read_options(args))
    print(f"wrote {n} {args.to} records to {args.output}")
    return 0


def _highlight(example, color: bool) -> str:
    """The rendered text with learnable characters marked: green when on a terminal, else ⟦…⟧."""
    from .data.tokenize import IGNORE_INDEX

    marked = [False] * len(example.text)
    extra_eos = False
    for label, (start, end) in zip(example.labels, example.offsets):
        if label == IGNORE_INDEX:
            continue
        if end <= start:  # an appended EOS that stands for no text
            extra_eos = True
        for i in range(start, end):
            marked[i] = True
    open_, close = ("\x1b[42;30m", "\x1b[0m") if color else ("⟦", "⟧")
    out, inside = [], False
    for ch, m in zip(example.text, marked):
        if m != inside:
            out.append(open_ if m else close)
            inside = m
        out.append(ch)
    if inside:
        out.append(close)
    if extra_eos:
        out.append(f"{open_}<eos>{close}")
    return "".join(out)


def cmd_data_preview(args) -> int:
    from .data.formats import kind_of, read_records, to_chat
    from .data.tokenize import tokenize_records
    from .models import load_generation_config, load_tokenizer

    records = read_records(args.file, **_read_options(args))
    kind = kind_of(records[0])
    if kind not in ("chat", "completion"):
        raise UsageError(f"{args.file} holds {kind} records; preview shows generation (chat or completion) data")
    if args.to == "chat":
        records = [to_chat(r) for r in records]
    tokenizer = load_tokenizer(args.model)
    examples, stats = tokenize_records(tokenizer, records, max_length=args.max_length,
                                       chat_template=args.chat_template, source=args.file,
                                       generation_config=load_generation_config(args.model))
    color = args.color if args.color is not None else sys.stdout.isatty()
    for n, example in enumerate(examples[: args.limit], start=1):
        print(f"── example {n}: {len(example.input_ids)} tokens, {example.num_learnable} learnable ──")
        print(_highlight(example, color))
    lengths = sorted(stats.lengths)
    print(f"── {stats.examples} examples: {sum(lengths)} tokens (mean {sum(lengths) / max(len(lengths), 1):.0f}, "
          f"max {lengths[-1] if lengths else 0}), {stats.learnable_tokens} learnable after truncation")
    if args.max_length:
        print(f"── max_length={args.max_length}: {stats.truncated} truncated, {stats.dropped} dropped "
              "(no learnable token left)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------

def _load_messages(value: str) -> list[dict]:
    """--messages takes a JSON list, a JSON object with "messages", or a path to a file holding either."""
    from .data.readers import parse_json

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


def _sampling(args):
    """The SamplingParams of the generate, chat and eval commands' flags (see _sampling_flags)."""
    from .generation import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                              presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                              seed=args.seed, stop=args.stop or [])
    except ValueError as err:
        raise UsageError(str(err)) from None


def _load_placed(name: str, device: str):
    """(model, tokenizer) for generation, the model on `device` (--device)."""
    from .generation.device import place
    from .models import load

    model, tokenizer = load(name)
    return place(model, device), tokenizer


def cmd_generate(args) -> int:
    from .generation import generate

    if (args.prompt is None) == (args.messages is None):
        raise UsageError("give either --prompt TEXT (completion) or --messages JSON|FILE (chat)")
    messages = _load_messages(args.messages) if args.messages is not None else None
    if messages is not None and args.system:
        messages = [{"role": "system", "content": args.system}] + messages
    params = _sampling(args)
    model, tokenizer = _load_placed(args.model, args.device)
    on_text = None if args.no_stream else (lambda piece: print(piece, end="", flush=True))
    result = generate(model, tokenizer, prompt=args.prompt, messages=messages, params=params,
                      chat_template=args.chat_template, on_text=on_text)
    print(result.text if args.no_stream else "")
    print(f"[{result.completion_tokens} tokens, finish_reason={result.finish_reason}]", file=sys.stderr)
    return 0


def _format_metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_comparison(metrics: dict) -> None:
    """Before/after table of the eval metrics a run recorded."""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    names = [n for n in dict.fromkeys([*before, *after])
             if isinstance(before.get(n, after.get(n)), (int, float)) and n != "examples"]
    if not names:
        return
    print(f"{'metric':20} {'before':>10} {'after':>10}")
    for name in names:
        print(f"{name:20} {_format_metric(before.get(name, '-')):>10} {_format_metric(after.get(name, '-')):>10}")


def cmd_train(args) -> int:
    from .training import train

    run = train(args.config, args.overrides, resume=args.resume)
    if run.metrics:
        train_metrics = run.metrics.get("train", {})
        print(f"run saved to {run.path} ({train_metrics.get('wall_seconds', 0):.0f} s of training, "
              f"{train_metrics.get('trainable_parameters', 0):,} trainable parameters)")
        print_comparison(run.metrics)
        _print_next_steps(run.path)
    return 0


def _print_next_steps(run_path) -> None:
    """The two commands to talk to a generative run just made."""
    info = runs.read_info(run_path) or {}
    if info.get("task") != "sft":
        return
    name, command = Path(run_path).name, _command_name()
    print(f"\nchat with it:  {command} chat --model {run_path}")
    print(f"serve it:      {command} serve --model {info['base_model']} --adapter {name}={run_path}\n"
          f"               (OpenAI API on http://127.0.0.1:8000/v1, model name {name!r})")


def _command_name() -> str:
    """`tunesmith` when that is what the shell finds, else the path of this environment's command
    (`.venv/bin/tunesmith` after `make demo`, whose venv the user has not activated)."""
    import shutil

    here = Path(sys.executable).with_name("tunesmith")
    if not here.exists() or shutil.which("tunesmith") == str(here):
        return "tunesmith"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def cmd_export(args) -> int:
    from .export import export

    if args.gguf and args.lora_only:
        from .gguf_lora import export_lora_gguf

        result = export_lora_gguf(args.run, args.output, quant=args.quant or "f32", force=args.force,
                                  verify=not args.no_verify)
        print(f"exported the LoRA adapter of {args.run} to {result.path} ({result.quant}, {result.pairs} adapted "
              f"weights, alpha {result.alpha:g})")
        base = result.base_gguf or "the base model as GGUF"
        print(f"apply it to its base: llama-cli -m {base} --lora {result.path}")
        print(f"verified: {result.verification}" if result.verification else
              "not verified (--no-verify)" if args.no_verify else
              "not verified: checking an adapter needs llama.cpp (make setup-fast)")
        return 0
    if args.gguf:
        from .gguf_export import export_gguf

        result = export_gguf(args.run, args.output, quant=args.quant or "f16", force=args.force,
                             verify=not args.no_verify)
        print(f"exported {args.run} to {result.path} ({result.quant}), with {result.modelfile}")
        print(f"verified: {result.verification}" if result.verification else "not verified (--no-verify)")
        return 0
    if args.quant or args.no_verify or args.lora_only:
        raise UsageError("--quant, --lora-only and --no-verify apply only to --gguf exports")
    out = export(args.run, args.output, merge=args.merge, force=args.force)
    print(f"exported {args.run} to {out}" + (" (adapter merged)" if args.merge else ""))
    return 0


def cmd_serve(args) -> int:
    from .serve import ServeSettings, parse_adapters, resolve_api_key, serve

    if args.runs is not None and not Path(args.runs).is_dir():  # before the model loads, not minutes after
        raise UsageError(f"--runs {args.runs}: no such directory; give the directory your runs are in")
    settings = ServeSettings(api_key=resolve_api_key(args.api_key, args.api_key_file),
                             conversations=args.conversations, max_body_bytes=args.max_body_bytes, runs=args.runs)
    print(f"tunesmith: loading {args.model} to serve it on http://{args.host}:{args.port}/v1 (web page: "
          f"http://{args.host}:{args.port}/)", file=sys.stderr, flush=True)
    serve(args.model, parse_adapters(args.adapter), host=args.host, port=args.port, settings=settings,
          chat_template=args.chat_template, max_batch=args.max_batch, max_queue=args.max_queue,
          context_window=args.context_window, device=args.device, backend=args.backend, threads=args.threads,
          gguf_quant=args.gguf_quant)
    return 0


def cmd_chat(args) -> int:
    from .serve.chat import chat_repl

    params = _sampling(args)
    model, tokenizer = _load_placed(args.adapter or args.model, args.device)
    chat_repl(model, tokenizer, params=params, system=args.system, chat_template=args.chat_template)
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate
    from .metrics import scalars

    from .config import load_prompting

    if args.shots and not args.train_data:
        raise UsageError(f"--shots {args.shots} needs --train-data FILE to take the exemplars from")
    prompting = None
    if args.prompting or args.shots or args.calibrate:
        prompting = load_prompting(args.prompting or {}, shots=args.shots, calibrate=args.calibrate or None)
    params = _sampling(args)
    result = evaluate(args.model, args.data, task=args.task, prompting=prompting, train_data=args.train_data,
                      output_dir=args.output, limit=args.limit, chat_template=args.chat_template, params=params,
                      normalize=args.normalize, seed=args.seed or 0, device=args.device)
    for name, value in scalars(result.metrics).items():
        print(f"{name:20} {_format_metric(value)}")
    if args.output:
        print(f"metrics and predictions written to {args.output}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare

    report = compare(args.config)
    from .report import markdown_table

    print(markdown_table(report["table"]["header"], report["table"]["rows"]))
    print(f"report written to {Path(report['output_dir']) / 'report.html'}")
    return 0


def cmd_continual(args) -> int:
    from .continual import continual
    from .continual.report import SUMMARIES
    from .report import _fmt, markdown_table

    report = continual(args.config, overrides=args.overrides)
    header = ["strategy", *(label for _, label in SUMMARIES)]
    rows = [[name, *(_fmt(s["summary"][key]) for key, _ in SUMMARIES)] for name, s in report["strategies"].items()]
    print(markdown_table(header, rows))
    print(f"report written to {Path(report['output_dir']) / 'report.html'}")
    return 0


def cmd_models(args) -> int:
    from .models import EMBEDDED

    for name, spec in EMBEDDED.items():
        print(f"{name:24} {spec.description}")
    return 0


# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .gguf_export import QUANTS
    from .models import DEFAULT_CHAT_MODEL

    parser = argparse.ArgumentParser(prog="tunesmith", description="Adapt a language model to your task and serve it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="validate, convert and preview datasets").add_subparsers(
        dest="data_command", required=True)

    def device_flag(p):
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where the model runs: auto (default) = CUDA in bfloat16 when a GPU is visible, else CPU")

    def sampling_flags(p, *, max_new_tokens: int):
        """The same sampling settings on generate, chat and eval: same flags, same seed, same text."""
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0, help="0 = off")
        p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
        p.add_argument("--presence-penalty", type=float, default=0.0)
        p.add_argument("--frequency-penalty", type=float, default=0.0)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
        device_flag(p)

    def read_flags(p):
        p.add_argument("--format", help="input format (default: detected from the file and its keys)")
        p.add_argument("--text-column", help="CSV/TSV column with the text (default: text)")
        p.add_argument("--label-column", help="CSV/TSV column with the label (default: label)")

    p = data.add_parser("validate", help="check files and report every problem with file:line: field")
    p.add_argument("files", nargs="+")
    read_flags(p)
    p.set_defaults(func=cmd_data_validate)

    p = data.add_parser("convert", help="convert a dataset to chat or completion JSONL")
    p.add_argument("input")
    p.add_argument("--to", choices=["chat", "completion"], required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    read_flags(p)
    p.set_defaults(func=cmd_data_convert)

    p = data.add_parser("preview", help="show rendered examples with the learnable tokens highlighted")
    p.add_argument("file")
    p.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    p.add_argument("--max-length", type=int, help="truncate to this many tokens and report what is lost")
    p.add_argument("--limit", type=int, default=3, help="how many examples to show (default 3)")
    p.add_argument("--to", choices=["chat"], help="convert records to chat first")
    p.add_argument("--chat-template", help="a named fallback (chatml, llama3, plain) or a Jinja template")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None)
    read_flags(p)
    p.set_defaults(func=cmd_data_preview)

    p = sub.add_parser("generate", help="generate a completion or a chat reply")
    p.add_argument("--model", default=DEFAULT_CHAT_MODEL, help=f"embedded name, directory or hub id "
                   f"(default {DEFAULT_CHAT_MODEL})")
    p.add_argument("--prompt", help="completion format: text to continue")
    p.add_argument("--messages", help="chat format: JSON list of messages, or a file holding it")
    p.add_argument("--system", help="prepend a system message (chat)")
    sampling_flags(p, max_new_tokens=256)
    p.add_argument("--chat-template", help="a named fallback (chatml, llama3, plain) or a Jinja template")
    p.add_argument("--no-stream", action="store_true", help="print the reply only when complete")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train as a YAML config says; evaluates before and after")
    p.add_argument("config", help="YAML recipe (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. method.r=16")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a run as a standalone model, a plain peft adapter, or a GGUF file")
    p.add_argument("run")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    p.add_argument("--gguf", action="store_true", help="write OUTPUT as one GGUF file (adapter merged, the run's "
                   "tokenizer and chat template inside) for llama.cpp/Ollama, and an Ollama Modelfile beside it")
    p.add_argument("--quant", choices=list(QUANTS), help="GGUF weight type (default: f16; with --lora-only, f32)")
    p.add_argument("--lora-only", action="store_true", help="with --gguf: write only the LoRA adapter, as a GGUF "
                   "LoRA that llama.cpp applies to the base model's GGUF (--lora)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the GGUF back and comparing it with the run")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve the model and adapters over an OpenAI-compatible HTTP API")
    p.add_argument("--model", default=DEFAULT_CHAT_MODEL, help="base model: embedded name, directory or hub id")
    p.add_argument("--adapter", action="append", metavar="NAME=RUN", help="serve a trained run under NAME "
                   "(repeatable); clients pick it with model=NAME")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health (visible in "
                   "`ps`: prefer --api-key-file or $TUNESMITH_API_KEY)")
    p.add_argument("--api-key-file", metavar="FILE", help="read the API key from FILE (surrounding whitespace ignored)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (1 = batching off)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--context-window", type=int, help="default: the model's max_position_embeddings")
    p.add_argument("--conversations", default="tunesmith-conversations.sqlite",
                   help="SQLite file for /v1/conversations (default: ./tunesmith-conversations.sqlite)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--chat-template", help="a named fallback (chatml, llama3, plain) or a Jinja template")
    p.add_argument("--runs", metavar="DIR", help="list the runs and compare/continual reports under DIR in the "
                   "web page at / (its runs view)")
    p.add_argument("--backend", choices=["torch", "llama-cpp"], default="torch",
                   help="the decoder: torch (default; every adapter type) or llama-cpp (GGUF on llama.cpp: 3.4-3.6x "
                   "torch for one client on a 2-core CPU, see docs/backends.md; a run is exported to GGUF on first "
                   "use; needs `make setup-fast`)")
    p.add_argument("--threads", type=int, help="llama-cpp backend: llama.cpp's threads (default: every core this "
                   "process may use)")
    p.add_argument("--gguf-quant", choices=list(QUANTS), help="llama-cpp backend: the GGUF type a run is exported "
                   "at on first use (default: q8_0, 1.6x f16's speed; f16 is exact; 4-bit types are faster, and "
                   "refused when they lose what training changed)")
    device_flag(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a model or a trained run in the terminal")
    p.add_argument("--model", default=DEFAULT_CHAT_MODEL)
    p.add_argument("--adapter", metavar="RUN", help="a trained run directory (its base model is loaded)")
    p.add_argument("--system", help="system prompt")
    sampling_flags(p, max_new_tokens=256)
    p.add_argument("--chat-template", help="a named fallback (chatml, llama3, plain) or a Jinja template")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="score a model or run on held-out data; writes metrics and predictions")
    p.add_argument("--model", default=DEFAULT_CHAT_MODEL, help="embedded name, directory, hub id or tunesmith run")
    p.add_argument("--data", required=True, help="held-out data (any format `data validate` reads)")
    p.add_argument("--task", choices=["sft", "classify", "ner"], help="default: the run's, else from the data")
    p.add_argument("-o", "--output", help=f"directory for {runs.METRICS} and {runs.PREDICTIONS}")
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--prompting", help="YAML file with prompting settings (template, instruction, verbalizer, "
                                       "format, shots, calibrate); classify on a causal LM uses label words")
    p.add_argument("--shots", type=int, help="k-shot prompting with exemplars from --train-data")
    p.add_argument("--train-data", help="where k-shot exemplars come from")
    p.add_argument("--calibrate", action="store_true", help="contextual calibration of label-word scores")
    p.add_argument("--normalize", action="store_true", help="exact match after lowercasing and dropping punctuation")
    sampling_flags(p, max_new_tokens=64)
    p.add_argument("--chat-template", help="a named fallback (chatml, llama3, plain) or a Jinja template")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="run several ways to adapt on one task and write a side-by-side report")
    p.add_argument("config", help="comparison YAML (see examples/compare-*.yaml); finished entries are skipped")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("continual", help="learn a sequence of tasks with each strategy and report what was forgotten")
    p.add_argument("config", help="sequence YAML (see examples/continual-support.yaml); finished steps are skipped")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override sequence keys (e.g. output_dir=...)")
    p.set_defaults(func=cmd_continual)

    p = sub.add_parser("models", help="list the embedded models")
    p.set_defaults(func=cmd_models)
    return parser


TRAINING_COMMANDS = ("train", "continual", "compare")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in TRAINING_COMMANDS:  # the real command line, not a test's call
        from .allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc(sys.argv[1:])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="tunesmith: %(levelname)s: %(message)s")
    if not args.verbose:  # transformers' per-load progress bars are noise next to a streamed reply
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except UsageError as err:
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return 2
    except (TunesmithError, OSError) as err:
        # Every user-facing error derives from TunesmithError; OSError covers files that cannot be read or
        # written. Anything else is a bug and keeps its traceback.
        print(f"tunesmith: error: {_sentence(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130


def _sentence(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror.lower()}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())

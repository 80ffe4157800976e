"""`tunesmith data validate | convert | preview`: check datasets, convert them, and show what a model learns
from them."""

from __future__ import annotations

import argparse
import json
import sys

from ..data.formats import CONVERSIONS
from ..errors import UsageError
from .common import model_options


def _read_options(args) -> dict:
    return {k: v for k, v in {"format": args.format, "text_column": args.text_column,
                              "label_column": args.label_column}.items() if v is not None}


def cmd_data_validate(args) -> int:
    from ..data.formats import validate

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
    from ..data.formats import convert_file

    n = convert_file(args.input, args.output, to=args.to, force=args.force, **_read_options(args))
    print(f"wrote {n} {args.to} records to {args.output}")
    return 0


def _highlight(example, color: bool) -> str:
    """The rendered text with learnable characters marked: green when on a terminal, else ⟦…⟧."""
    from ..data.tokenize import IGNORE_INDEX

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


def _shown(records: list[dict], kind: str) -> list[tuple[str, dict]]:
    """(heading, chat or completion record) of what preview shows: each record, or each reply of a preference
    record with the prompt before it, its learnable tokens the reply's (as training masks them)."""
    from ..data.preference import as_sft

    if kind == "preference":
        return [(f"pair {n}, {reply}", as_sft(r, reply)) for n, r in enumerate(records, 1)
                for reply in ("chosen", "rejected")]
    if kind == "unpaired":
        return [(f"example {n}, a {'good' if r['label'] else 'bad'} reply", as_sft(r, "completion"))
                for n, r in enumerate(records, 1)]
    return [(f"example {n}", r) for n, r in enumerate(records, 1)]


def cmd_data_preview(args) -> int:
    from ..data.formats import kind_of, read_records, to_chat
    from ..data.tokenize import tokenize_records, truncate
    from ..models import load_generation_config, load_tokenizer

    records = read_records(args.file, **_read_options(args))
    kind = kind_of(records[0])
    if kind not in ("chat", "completion", "preference", "unpaired"):
        raise UsageError(f"{args.file} holds {kind} records; preview shows generation (chat or completion) and "
                         "preference data")
    if args.to == "chat":
        records = [to_chat(r) for r in records]
    shown = _shown(records, kind)
    tokenizer = load_tokenizer(args.model)
    # Truncated here rather than by tokenize_records, which drops what loses every learnable token: each heading
    # stays with its example.
    examples, stats = tokenize_records(tokenizer, [record for _, record in shown], chat_template=args.chat_template,
                                       source=args.file, generation_config=load_generation_config(args.model),
                                       chat_template_kwargs=_kwargs(args.chat_template_kwargs),
                                       reasoning=args.reasoning)
    if args.max_length:
        examples = [truncate(e, args.max_length) for e in examples]
    color = args.color if args.color is not None else sys.stdout.isatty()
    per_record = len(shown) // len(records)
    for (heading, _), example in list(zip(shown, examples))[: args.limit * per_record]:
        print(f"── {heading}: {len(example.input_ids)} tokens, {example.num_learnable} learnable ──")
        print(_highlight(example, color))
    lengths = sorted(stats.lengths)
    learnable = sum(e.num_learnable for e in examples)
    print(f"── {stats.examples} examples{f' ({len(records)} pairs)' if kind == 'preference' else ''}: "
          f"{sum(lengths)} tokens (mean {sum(lengths) / max(len(lengths), 1):.0f}, max {lengths[-1] if lengths else 0}), "
          f"{learnable} learnable after truncation")
    if args.max_length:
        truncated = sum(n > args.max_length for n in lengths)
        print(f"── max_length={args.max_length}: {truncated} truncated, {sum(not e.num_learnable for e in examples)} "
              "dropped (no learnable token left)")
    return 0


def _kwargs(text: str | None) -> dict | None:
    """--chat-template-kwargs: a JSON object, as data.chat_template_kwargs in a training config."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as err:
        raise UsageError(f"--chat-template-kwargs is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise UsageError('--chat-template-kwargs must be a JSON object, e.g. \'{"enable_thinking": false}\'')
    return value


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="validate, convert and preview datasets").add_subparsers(
        dest="data_command", required=True)
    read = argparse.ArgumentParser(add_help=False)
    read.add_argument("--format", help="input format (default: detected from the file and its keys)")
    read.add_argument("--text-column", help="CSV/TSV column with the text (default: text)")
    read.add_argument("--label-column", help="CSV/TSV column with the label (default: label)")

    p = data.add_parser("validate", parents=[read], help="check files and report every problem with file:line: field")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_data_validate)

    p = data.add_parser("convert", parents=[read], help="convert a dataset to chat, completion or preference JSONL")
    p.add_argument("input")
    p.add_argument("--to", choices=CONVERSIONS, required=True,
                   help="chat, completion; for preference data: preference (TRL's pairs), openai-preference, kto "
                        "(TRL's unpaired records: a pair gives a good and a bad one), or chat (prompt and chosen reply)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(func=cmd_data_convert)

    p = data.add_parser("preview", parents=[read, model_options("model", "chat_template")],
                        help="show rendered examples with the learnable tokens highlighted (both replies of a "
                             "preference pair)")
    p.add_argument("file")
    p.add_argument("--max-length", type=int, help="truncate to this many tokens and report what is lost")
    p.add_argument("--limit", type=int, default=3, help="how many examples to show (default 3)")
    p.add_argument("--to", choices=["chat"], help="convert records to chat first")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--chat-template-kwargs", metavar="JSON", help="extra template variables, as the training "
                   "config's data.chat_template_kwargs (e.g. '{\"enable_thinking\": false}')")
    p.add_argument("--reasoning", choices=["auto", "train", "drop"], default="auto",
                   help="assistant reasoning_content: as the template renders it (auto), required among the "
                        "learnable tokens (train), or removed (drop), as data.reasoning in training")
    p.set_defaults(func=cmd_data_preview)

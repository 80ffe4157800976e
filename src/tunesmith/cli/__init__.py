"""The `tunesmith` command: thin argument parsing over the Python API. `main(argv) -> int` so tests call it
directly.

One module per concern: data.py (validate, convert, preview), serve.py (generate, chat, serve), chat.py (the
terminal chat), train.py (train, eval, export, compare, continual), common.py (flags derived from typed configs,
the shared parent parsers, error sentences)."""

from __future__ import annotations

import argparse
import logging
import sys

from . import data, serve, train
from .common import run_command

TRAINING_COMMANDS = ("train", "continual", "compare")


def cmd_models(args) -> int:
    from ..models import EMBEDDED

    for name, spec in EMBEDDED.items():
        print(f"{name:24} {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunesmith", description="Adapt a language model to your task and serve it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (data, serve, train):
        commands.add_commands(sub)
    sub.add_parser("models", help="list the embedded models").set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in TRAINING_COMMANDS:  # the real command line, not a test's call
        from ..allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc(sys.argv[1:])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="tunesmith: %(levelname)s: %(message)s")
    if not args.verbose:  # transformers' per-load progress bars are noise next to a streamed reply
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())

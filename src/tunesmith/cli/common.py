"""What the commands share: flags derived from typed configs (`add_fields`, `config_from_args`), the parent
parsers for the model and the sampling settings, and turning errors into one `tunesmith: error:` sentence."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterable
from dataclasses import fields

from pydantic import BaseModel, ValidationError

from ..errors import TunesmithError, UsageError
from ..generation.params import LIMITS, SamplingParams, describe
from ..serve.config import ModelOptions


def _flag_type(annotation) -> tuple[type, list | None]:
    """(the argparse type, its choices) of a field's annotation: `int | None` -> int, a Literal -> its values."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, list(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return _flag_type(next(arg for arg in typing.get_args(annotation) if arg is not type(None)))
    return annotation, None


def flag_name(model: type[BaseModel], name: str) -> str:
    """The flag of a field: `--field-name`, unless the field names another (json_schema_extra's `flag`)."""
    return (model.model_fields[name].json_schema_extra or {}).get("flag", "--" + name.replace("_", "-"))


def add_fields(parser: argparse.ArgumentParser, model: type[BaseModel], names: Iterable[str] | None = None) -> None:
    """One flag per field of `model` (or per field in `names`): its type, default and choices from the field,
    its --help from the field's description; the value lands under the field's name."""
    for name in names or model.model_fields:
        info = model.model_fields[name]
        extra = info.json_schema_extra or {}
        options = {"dest": name, "help": info.description, "metavar": extra.get("metavar")}
        if extra.get("repeat"):
            options["action"] = "append"
        else:
            kind, choices = _flag_type(info.annotation)
            options.update(type=kind, default=info.default, choices=extra.get("choices", choices))
        parser.add_argument(flag_name(model, name), **options)


def config_from_args(model: type[BaseModel], args: argparse.Namespace):
    """`model` validated from the parsed flags; a UsageError naming each flag and what is wrong with it."""
    values = {name: getattr(args, name) for name in model.model_fields}
    try:
        return model.model_validate(values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            message = e["msg"].removeprefix("Value error, ")
            if e["loc"] and not message.startswith("--"):  # a message that names its flag stands alone
                message = f"{flag_name(model, e['loc'][0])} {values[e['loc'][0]]}: {message}"
            problems.append(message)
        raise UsageError("; ".join(problems)) from None


def model_options(*names: str) -> argparse.ArgumentParser:
    """A parent parser with the flags of these ModelOptions fields (model, chat_template, device)."""
    parent = argparse.ArgumentParser(add_help=False)
    add_fields(parent, ModelOptions, names)
    return parent


# The SamplingParams fields the commands take as flags, with what a value means; the default and the range
# in the help come from SamplingParams and its LIMITS.
SAMPLING_FLAGS = {"max_new_tokens": "", "temperature": "0 = greedy", "top_p": "", "top_k": "0 = off",
                  "repetition_penalty": "1 = off", "presence_penalty": "", "frequency_penalty": ""}


def sampling_options(max_new_tokens: int) -> argparse.ArgumentParser:
    """A parent parser with the sampling flags: the same flags, seed and text on generate, chat and eval."""
    parent = argparse.ArgumentParser(add_help=False)
    defaults = {f.name: f.default for f in fields(SamplingParams)} | {"max_new_tokens": max_new_tokens}
    for name, meaning in SAMPLING_FLAGS.items():
        parent.add_argument("--" + name.replace("_", "-"), type=type(defaults[name]), default=defaults[name],
                            help=f"{meaning + '; ' if meaning else ''}{describe(LIMITS[name])} "
                                 f"(default: {defaults[name]})")
    parent.add_argument("--seed", type=int, help="sample reproducibly: the same seed gives the same text")
    parent.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    return parent


def sampling(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of the sampling flags; a value out of range is a UsageError."""
    try:
        return SamplingParams(**{name: getattr(args, name) for name in SAMPLING_FLAGS}, seed=args.seed,
                              stop=args.stop or [])
    except ValueError as err:
        raise UsageError(str(err)) from None


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; a user's mistake is one `tunesmith: error:` sentence and an exit code."""
    try:
        return args.func(args)
    except UsageError as err:
        print(f"tunesmith: error: {err}", file=sys.stderr)
        return 2
    except (TunesmithError, OSError) as err:
        # Every user-facing error derives from TunesmithError; OSError covers files that cannot be read or
        # written. Anything else is a bug and keeps its traceback.
        print(f"tunesmith: error: {sentence(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tunesmith: interrupted", file=sys.stderr)
        return 130


def sentence(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror.lower()}"
    return str(err)

"""tunesmith: adapt a language model to your task and serve it.

The Python API; the `tunesmith` command is a thin layer over these functions. Verbs are functions
(`train`, `evaluate`, `generate`, `stream`, `load`); the three commands that own a package are reached through
it (`tunesmith.compare.run`, `tunesmith.continual.run`, `tunesmith.serve.run`), so no function shadows a
module: importing `tunesmith.compare.report` can never turn `tunesmith.compare` into something else."""

from .errors import TunesmithError, UsageError
from .data.formats import DataError, convert_file, read_records, validate, write_jsonl
from .data.templates import PromptTemplate, render_chat, select_shots
from .data.tokenize import MaskError, tokenize_chat, tokenize_completion, tokenize_records
from .generation import Generation, SamplingParams, generate, stream
from .models import EMBEDDED, load, load_causal_lm, load_tokenizer, resolve
from .serve import ServeConfig, load_engine
from .evaluation import Evaluation, evaluate
from . import version

__version__ = version.__version__

__all__ = [
    "TunesmithError", "UsageError",
    "DataError", "convert_file", "read_records", "validate", "write_jsonl",
    "PromptTemplate", "render_chat", "select_shots",
    "MaskError", "tokenize_chat", "tokenize_completion", "tokenize_records",
    "Generation", "SamplingParams", "generate", "stream",
    "EMBEDDED", "load", "load_causal_lm", "load_tokenizer", "resolve",
    "ServeConfig", "ServeSettings", "create_app", "load_engine",
    "evaluate", "Evaluation", "PromptingConfig", "classify_by_prompting", "train",
    "compare", "continual", "serve",  # modules: their run() is the entry point
]

# Prompting and training load torch at import; they are imported when first asked for, like the server.
_LAZY = {"PromptingConfig": ".config", "classify_by_prompting": ".evaluation.prompting", "train": ".training"}
_MODULES = ("compare", "continual")  # their runners load torch: imported when first asked for


def __getattr__(name: str):
    import importlib

    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name in ("create_app", "ServeSettings"):  # FastAPI loads only when the server is asked for
        return getattr(importlib.import_module(".serve.app", __name__), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")

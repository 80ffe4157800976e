"""tunesmith: adapt a language model to your task and serve it.

The Python API; the `tunesmith` command is a thin layer over these functions."""

from .data.formats import DataError, convert_file, read_records, validate, write_jsonl
from .data.templates import PromptTemplate, render_chat, select_shots
from .data.tokenize import MaskError, tokenize_chat, tokenize_completion, tokenize_records
from .generate import Generation, SamplingParams, generate, stream
from .models import EMBEDDED, load, load_causal_lm, load_tokenizer, resolve

__version__ = "0.1.0"
__all__ = [
    "DataError", "convert_file", "read_records", "validate", "write_jsonl",
    "PromptTemplate", "render_chat", "select_shots",
    "MaskError", "tokenize_chat", "tokenize_completion", "tokenize_records",
    "Generation", "SamplingParams", "generate", "stream",
    "EMBEDDED", "load", "load_causal_lm", "load_tokenizer", "resolve",
]

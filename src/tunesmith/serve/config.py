"""What `tunesmith serve` takes, typed once: `ServeConfig`. The command's flags are derived from its fields (a
field's description is the flag's --help), `tunesmith.serve.run(...)` takes the same fields, and the app's
`ServeSettings` is built from it in one place (`ServeConfig.settings`). `ModelOptions` holds what every
command that runs a model shares (model, chat template, device); the CLI's parent parsers come from it.

A field's `json_schema_extra` says what a flag needs beyond its type: `flag` (its name when not the field's),
`metavar`, `choices`, `repeat` (the flag may be given several times)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..generation.device import DEVICES
from ..export import QUANTS
from ..generation.engine import MAX_BATCH
from ..generation.prefix_cache import DEFAULT_MB as PREFIX_CACHE_MB
from ..models import DEFAULT_CHAT_MODEL
from .adapters import ServeError, parse_adapters
from .backends import BACKENDS

API_KEY_ENV = "TUNESMITH_API_KEY"


class ModelOptions(BaseModel):
    """The model a command runs and how: shared by generate, chat, eval, data preview and serve."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_CHAT_MODEL, description="embedded name, directory, hub id or tunesmith run "
                                                       f"(default: {DEFAULT_CHAT_MODEL})")
    chat_template: str | None = Field(None, description="a named fallback (chatml, llama3, plain) or a Jinja template")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", json_schema_extra={"choices": DEVICES},
                        description="where the model runs: auto (default) = CUDA in bfloat16 when a GPU is visible, "
                                    "else CPU")


class ServeConfig(ModelOptions):
    """Everything `tunesmith serve` takes."""

    adapters: dict[str, str] = Field(default_factory=dict, json_schema_extra={
        "flag": "--adapter", "metavar": "NAME=RUN", "repeat": True}, description="serve a trained run under NAME "
        "(repeatable); clients pick it with model=NAME")
    host: str = Field("127.0.0.1", description="address to listen on (default: 127.0.0.1, this machine only)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (default: 8000)")
    api_key: str | None = Field(None, repr=False, description="require 'Authorization: Bearer KEY' on every route "
                                "but /health (visible in `ps`: prefer --api-key-file or $TUNESMITH_API_KEY)")
    api_key_file: str | None = Field(None, json_schema_extra={"metavar": "FILE"},
                                     description="read the API key from FILE (surrounding whitespace ignored)")
    max_batch: int = Field(MAX_BATCH, ge=1, description=f"rows decoded together (1 = batching off; default: {MAX_BATCH})")
    max_queue: int = Field(64, ge=0, description="waiting requests before answering 429 (0 = no bound)")
    # 256 MB: on the embedded Qwen2.5-0.5B, ~10,000 tokens of torch's float32 KV (24 KB a token; ~20,000 of
    # llama.cpp's f16), the histories of dozens of conversations, beside ~2 GB of weights.
    prefix_cache_mb: int = Field(PREFIX_CACHE_MB, ge=0, description="memory for the KV of prompts seen before, "
                                 "reused by requests that begin with the same tokens (conversations, shared system "
                                 f"prompts; least recently used out first; 0 = off; default: {PREFIX_CACHE_MB})")
    context_window: int | None = Field(None, ge=1, description="default: the model's max_position_embeddings")
    conversations: str = Field("tunesmith-conversations.sqlite", description="SQLite file for /v1/conversations "
                               "(default: ./tunesmith-conversations.sqlite)")
    max_body_bytes: int = Field(1_000_000, ge=1, description="larger request bodies are answered 413")
    runs: str | None = Field(None, json_schema_extra={"metavar": "DIR"}, description="list the runs and "
                             "compare/continual reports under DIR in the web page at / (its runs view)")
    feedback: str | None = Field(None, json_schema_extra={"metavar": "DIR"}, description="keep the web page's "
                                 "thumbs, edits and side-by-side choices under DIR as training data (kto.jsonl, "
                                 "sft.jsonl, preference.jsonl; only ever appended to); GET /v1/feedback lists them")
    state_dir: str | None = Field(None, json_schema_extra={"metavar": "DIR"}, description="where the server "
                                  "keeps uploaded files (/v1/files), fine-tuning jobs (/v1/fine_tuning/jobs) and the "
                                  "runs they train (default: server-state in the tunesmith cache directory, "
                                  "$TUNESMITH_CACHE or ~/.cache/tunesmith)")
    max_upload_mb: int = Field(100, ge=1, description="larger uploads to /v1/files are answered 413 (default: 100)")
    max_train_jobs: int = Field(1, ge=1, description="fine-tuning jobs that train at once, each in its own process; "
                                "the others wait in the queue (default: 1)")
    fine_tuning: Literal["on", "off"] = Field("on", description="the files and fine-tuning routes, which train and "
                                              "keep data on this machine: on (default; they also need an API key) "
                                              "or off, e.g. on a server others can reach")
    backend: Literal[tuple(BACKENDS)] = Field(
        "torch", description="the decoder: torch (default; every adapter type) or llama-cpp (GGUF on llama.cpp: "
        "3.4-3.6x torch for one client on a 2-core CPU, see docs/backends.md; a run is exported to GGUF on first "
        "use; needs `make setup-fast`)")
    threads: int | None = Field(None, ge=1, description="llama-cpp backend: llama.cpp's threads (default: every core "
                                "this process may use)")
    batch_invariance: Literal["off", "on"] | None = Field(
        None, description="llama-cpp backend: on = a request's logits do not depend on what runs beside it, so a "
        "greedy reply is the same under any load (a lone request decodes about 1.4x slower; default: off, "
        "where 10 of 16 greedy replies of the embedded model changed under load: docs/backends.md)")
    gguf_quant: Literal[tuple(QUANTS)] | None = Field(
        None, description="llama-cpp backend: the GGUF type a run is exported at on first use (default: q8_0, 1.6x "
        "f16's speed; f16 is exact; 4-bit types are faster, and refused when they lose what training changed)")

    @field_validator("adapters", mode="before")
    @classmethod
    def _named(cls, value):  # the flag's NAME=RUN strings (None when not given)
        return parse_adapters(value) if value is None or isinstance(value, list) else value

    @field_validator("runs")
    @classmethod
    def _runs_exist(cls, value):  # refused before the model loads, not minutes after
        if (problem := runs_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("feedback")
    @classmethod
    def _feedback_dir(cls, value):  # refused before the model loads; a missing directory is made
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise ValueError("is a file; give a directory (feedback is kept there in one JSONL file per kind)")
        return value

    @model_validator(mode="after")
    def _llama_cpp_options(self):
        if self.backend != "llama-cpp" and (given := self.backend_options()):
            raise ValueError(" and ".join("--" + k.replace("_", "-") for k in given) + " apply to --backend "
                             "llama-cpp only")
        return self

    def backend_options(self) -> dict:
        """The options only the llama-cpp backend takes, those that are set."""
        return {k: v for k, v in (("threads", self.threads), ("gguf_quant", self.gguf_quant),
                                  ("batch_invariance", self.batch_invariance)) if v is not None}

    def engine_options(self) -> dict:
        """The keyword arguments of the backend's `load_engine`, beside the model and its adapters."""
        return {"chat_template": self.chat_template, "context_window": self.context_window, "device": self.device,
                "max_batch": self.max_batch, "max_queue": self.max_queue, "prefix_cache_mb": self.prefix_cache_mb,
                **self.backend_options()}

    def settings(self, env: Mapping[str, str] | None = None):
        """The app's `ServeSettings`, the API key resolved (see resolve_api_key)."""
        from .app import ServeSettings

        return ServeSettings(api_key=resolve_api_key(self.api_key, self.api_key_file, env),
                             conversations=self.conversations, max_body_bytes=self.max_body_bytes, runs=self.runs,
                             feedback=self.feedback, state_dir=self.state_dir or str(_default_state_dir()),
                             max_upload_bytes=self.max_upload_mb * 2**20,
                             max_train_jobs=self.max_train_jobs, fine_tuning=self.fine_tuning == "on")


def _default_state_dir():
    """The server's state under the tunesmith cache directory: never the working directory, which may be a
    checkout (a server started in one would litter it with jobs and uploads)."""
    from ..models import cache_dir

    return cache_dir() / "server-state"


def runs_problem(path: str | None) -> str | None:
    """What is wrong with `path` as the runs directory the web page lists; None when nothing (or none given)."""
    if path is not None and not Path(path).is_dir():
        return f"--runs {path}: no such directory; give the directory your runs are in"
    return None


def resolve_api_key(value: str | None = None, file: str | Path | None = None,
                    env: Mapping[str, str] | None = None) -> str | None:
    """The server's API key: `value` (--api-key, which every user of the machine sees in `ps`), else the
    contents of `file` (--api-key-file), else $TUNESMITH_API_KEY; None when none is set (no authentication).
    Surrounding whitespace (a file's trailing newline) is dropped; an empty key is an error, not "no key"."""
    env = os.environ if env is None else env
    if value is not None and file is not None:
        raise ServeError("give the API key with --api-key or --api-key-file, not both")
    if file is not None:
        source = f"the API key file {file}"
        try:
            key = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ServeError(f"cannot read {source}: {getattr(err, 'strerror', None) or err}") from None
    elif value is not None:
        source, key = "--api-key", value
    elif env.get(API_KEY_ENV) is not None:
        source, key = f"${API_KEY_ENV}", env[API_KEY_ENV]
    else:
        return None
    key = key.strip()
    if not key:
        raise ServeError(f"{source} is empty: give a key, or none at all to serve without authentication")
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise ServeError(f"{source}: the API key must be printable ASCII without spaces (it travels in an HTTP "
                         "header)")
    return key

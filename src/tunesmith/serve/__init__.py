"""The OpenAI-compatible server: `create_app` (routes), `Engine` (batched generation), `load_engine`
(base model + adapters), `BACKENDS` (torch or llama.cpp behind the same routes), `resolve_api_key` (flag, file
or environment), the conversation store and the terminal chat. FastAPI loads only when the app is asked for,
so the CLI's other commands do not pay for it."""

import os
from collections.abc import Mapping
from pathlib import Path

from .adapters import ServeError, load_engine, parse_adapters
from .backends import BACKENDS
from ..generation import Engine, Served

API_KEY_ENV = "TUNESMITH_API_KEY"

__all__ = ["APIError", "BACKENDS", "Engine", "ServeError", "ServeSettings", "Served", "create_app", "load_engine",
           "parse_adapters", "resolve_api_key", "serve"]


def __getattr__(name: str):
    if name in ("APIError", "ServeSettings", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)


def serve(model: str, adapters: dict[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          settings=None, chat_template: str | None = None, max_batch: int = 8, max_queue: int = 64,
          context_window: int | None = None, device: str = "auto", backend: str = "torch",
          threads: int | None = None, gguf_quant: str | None = None) -> None:
    """Load the model and its adapters onto `device` (auto: CUDA when available) with the decoder `backend` (a
    key of BACKENDS), then serve until interrupted. `threads` and `gguf_quant` are the llama-cpp backend's."""
    import uvicorn

    from .app import create_app

    if backend not in BACKENDS:
        raise ServeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    options = {k: v for k, v in (("threads", threads), ("gguf_quant", gguf_quant)) if v is not None}
    if options and backend != "llama-cpp":
        flags = " and ".join("--" + k.replace("_", "-") for k in options)
        raise ServeError(f"{flags} apply to --backend llama-cpp only")
    engine = BACKENDS[backend].load_engine(model, adapters, chat_template=chat_template,
                                           context_window=context_window, max_batch=max_batch,
                                           max_queue=max_queue, device=device, **options)
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning")


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

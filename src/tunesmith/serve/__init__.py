"""The OpenAI-compatible server: `create_app` (routes), `Engine` (batched generation), `load_engine`
(base model + adapters), the conversation store and the terminal chat. FastAPI loads only when the app is
asked for, so the CLI's other commands do not pay for it."""

from .adapters import ServeError, load_engine, parse_adapters
from .engine import Engine, Served

__all__ = ["APIError", "Engine", "ServeError", "ServeSettings", "Served", "create_app", "load_engine",
           "parse_adapters", "serve"]


def __getattr__(name: str):
    if name in ("APIError", "ServeSettings", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)


def serve(model: str, adapters: dict[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          settings=None, chat_template: str | None = None, max_batch: int = 8, max_queue: int = 64,
          context_window: int | None = None) -> None:
    """Load the model and its adapters, then serve until interrupted."""
    import uvicorn

    from .app import create_app

    engine = load_engine(model, adapters, chat_template=chat_template, context_window=context_window,
                         max_batch=max_batch, max_queue=max_queue)
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning")

"""The OpenAI-compatible server: `run` (serve until interrupted, as `tunesmith serve` does), `ServeConfig`
(everything it takes), `create_app` (routes), `Engine` (batched generation), `load_engine` (base model +
adapters), `BACKENDS` (torch or llama.cpp behind the same routes), `resolve_api_key` (flag, file or environment)
and the conversation store. FastAPI loads only when the app is asked for, so the CLI's other commands do not pay
for it."""

from .adapters import ServeError, load_engine, parse_adapters
from .backends import BACKENDS
from .config import API_KEY_ENV, ModelOptions, ServeConfig, resolve_api_key
from ..config import validate
from ..generation import Engine, Served

__all__ = ["API_KEY_ENV", "APIError", "BACKENDS", "Engine", "ModelOptions", "ServeConfig", "ServeError",
           "ServeSettings", "Served", "create_app", "load_engine", "parse_adapters", "resolve_api_key", "run"]


def __getattr__(name: str):
    if name in ("APIError", "ServeSettings", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)


def run(config: ServeConfig | None = None, /, **fields) -> None:
    """Load the model and its adapters and serve them until interrupted: `run(ServeConfig(...))`, or the same
    fields as keywords (`run(model="...", adapters={"name": "runs/x"}, port=8080)`), which override a config's.
    Invalid fields are a ConfigError naming each one."""
    import uvicorn

    from .app import create_app

    if config is None or fields:
        config = validate(ServeConfig, {**(config.model_dump() if config else {}), **fields}, "serve")
    settings = config.settings()  # a bad key or --runs is refused before the model loads
    engine = BACKENDS[config.backend].load_engine(config.model, config.adapters, **config.engine_options())
    uvicorn.run(create_app(engine, settings), host=config.host, port=config.port, log_level="warning")

"""The OpenAI-compatible HTTP API over an `Engine`: built by `create_app(engine, settings)` so tests drive it
in-process and `tunesmith serve` runs it under uvicorn.

The routes live by family in `serve/routes/` and find what they serve on `app.state` (`engine`, `settings`,
`store`, `turns`, `prompts`, `feedback`); this module only builds the app. Every request is validated completely
before anything is queued or streamed; every error leaves in OpenAI's envelope (`serve/errors.py`). CPU work
that grows with the request (parsing, chat rendering, tokenization) runs in worker threads, so one large request
never stalls the event loop (other requests, /health). The web page at `/` (routes/web.py) is one more client
of this API."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request

from .adapters import ServeError
from .config import runs_problem
from .conversations import ConversationStore, TurnGate
from ..feedback import FeedbackError, FeedbackLog
from ..generation import Engine
from .errors import APIError, add_handlers
from .finetune import runner_for
from .prompts import Prompts
from .routes import (adapters, chat, classify, completions, conversations, feedback, files, fine_tuning, models,
                     web)
from .routes.common import MAX_BODY_BYTES

__all__ = ["APIError", "ServeSettings", "create_app"]


@dataclass
class ServeSettings:
    """What the routes read on `app.state.settings`; `tunesmith serve` builds it from its ServeConfig."""

    api_key: str | None = None  # when set, every route but /health needs `Authorization: Bearer KEY`; no /docs
    max_body_bytes: int = MAX_BODY_BYTES  # larger bodies are answered 413
    conversations: str = ":memory:"  # SQLite file for /v1/conversations
    completion_max_tokens: int = 16  # OpenAI's default for /v1/completions
    chat_max_tokens: int = 1024  # chat reply budget without max_tokens, capped by what is left of the window
    reply_reserve: int | None = None  # conversation reply budget without max_tokens (default: a quarter of the window)
    runs: str | None = None  # --runs: the directory whose runs and reports the web page lists (/v1/runs)
    feedback: str | None = None  # --feedback: the directory the page's gestures are kept in (/v1/feedback)
    state_dir: str | None = None  # uploaded files, fine-tuning jobs and their runs; None: no fine-tuning
    max_upload_bytes: int = 100 * 2**20  # larger uploads to /v1/files are answered 413
    max_train_jobs: int = 1  # fine-tuning jobs training at once
    fine_tuning: bool = True  # False: /v1/files and /v1/fine_tuning answer 403 (it also needs api_key, state_dir)


def check_key(request: Request) -> None:
    """The API-key check every router but /health's runs first (nothing to check when the server has no key)."""
    api_key = request.app.state.settings.api_key
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided." if given else "Missing API key: send "
                       "'Authorization: Bearer KEY'.", code="invalid_api_key", type="authentication_error")


async def _lifespan(app: FastAPI):
    app.state.engine.start()
    if app.state.tuning is not None:
        await app.state.tuning.start()
    yield
    if app.state.tuning is not None:
        await app.state.tuning.stop()
    app.state.engine.stop()
    app.state.store.close()


def create_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    if settings.api_key is not None and not settings.api_key.strip():
        raise ServeError("an empty API key would let anyone in: give a key, or None to serve without one")
    if (problem := runs_problem(settings.runs)) is not None:
        raise ServeError(problem)
    try:
        feedback_log = FeedbackLog(settings.feedback) if settings.feedback else None
    except FeedbackError as err:
        raise ServeError(str(err)) from None
    # With a key, the interactive docs go (a browser cannot send the key to them) and the schema needs the key.
    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if settings.api_key is not None else {}
    app = FastAPI(title="tunesmith", lifespan=_lifespan, **docs)
    state = app.state
    state.engine, state.settings, state.prompts = engine, settings, Prompts(engine)
    state.store, state.turns = ConversationStore(settings.conversations), TurnGate()
    state.feedback = feedback_log
    state.models_lock = asyncio.Lock()  # one load or unload of a served run at a time (routes/adapters.py)
    state.tuning, state.tuning_off = runner_for(engine, settings, state.models_lock)
    add_handlers(app)

    keyed = [Depends(check_key)]
    app.include_router(models.health_router)
    app.include_router(web.page_router)  # the page and its files: they hold no data
    if settings.api_key is not None:
        app.include_router(models.schema_router, dependencies=keyed)
    for family in (models, completions, chat, conversations, classify, adapters, web, feedback, files, fine_tuning):
        app.include_router(family.router, dependencies=keyed)
    return app

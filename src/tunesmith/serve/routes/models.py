"""What is served: GET /v1/models (the base model and every run loaded over it, each with its task and how it
was trained with tools: `tools` is run.json's record, e.g. {"mode": "convention", "style": "hermes"}, or null),
GET /health (open to all, with the engine's queue and batch counts) and, when the server has an API key, the
OpenAPI schema behind it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..tools import run_tools

router = APIRouter()
health_router = APIRouter()  # included without the API-key check
schema_router = APIRouter()  # only with an API key: the app's own /openapi.json (and /docs) are off then


@health_router.get("/health")
async def health(request: Request):
    return {"status": "ok", **request.app.state.engine.stats()}


@schema_router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request):
    return request.app.openapi()


@router.get("/v1/models")
async def models(request: Request):
    engine = request.app.state.engine
    base = next(iter(engine.models))
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "tunesmith", "root": base,
         "parent": None if name == base else base, "task": entry.task, "tools": run_tools(name, entry.run)}
        for name, entry in engine.models.items()]}

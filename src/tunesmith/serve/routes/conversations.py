"""/v1/conversations: create, list (newest first), read, list the messages of and delete the server-kept
conversations that /v1/chat/completions continues (the store is `app.state.store`)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from ..errors import APIError
from ..schemas import ConversationCreate
from .common import read

router = APIRouter()


def conversation_or_404(request: Request, cid: str) -> dict:
    found = request.app.state.store.get(cid)
    if found is None:
        raise APIError(404, f"No conversation {cid!r}.", param="conversation_id", code="conversation_not_found")
    return found


@router.post("/v1/conversations")
async def create_conversation(request: Request):
    body = await read(request, ConversationCreate)
    if body.model is not None and body.model not in request.app.state.engine.models:
        raise APIError(404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found")
    return request.app.state.store.create(model=body.model, system=body.system, metadata=body.metadata)


@router.get("/v1/conversations")
async def list_conversations(request: Request, limit: int = Query(100, ge=1, le=1000)):
    return {"object": "list", "data": request.app.state.store.recent(limit)}


@router.get("/v1/conversations/{cid}")
async def get_conversation(request: Request, cid: str):
    return conversation_or_404(request, cid)


@router.get("/v1/conversations/{cid}/messages")
async def conversation_messages(request: Request, cid: str):
    conversation_or_404(request, cid)
    return {"object": "list", "data": request.app.state.store.messages(cid)}


@router.delete("/v1/conversations/{cid}")
async def delete_conversation(request: Request, cid: str):
    conversation_or_404(request, cid)
    request.app.state.store.delete(cid)
    return {"id": cid, "object": "conversation.deleted", "deleted": True}

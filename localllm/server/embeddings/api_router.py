"""POST /v1/embeddings: parse the body, hand it to the app's `EmbeddingServing`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from localllm.server.auth import require_api_key
from localllm.server.embeddings.serving import EmbeddingServing
from localllm.server.serving import parse_body
from localllm.server.types import EmbeddingRequest

router = APIRouter(dependencies=[Depends(require_api_key)])


def embeddings(request: Request) -> EmbeddingServing:
    handler: EmbeddingServing = request.app.state.embeddings
    return handler


@router.post("/v1/embeddings")
async def create_embeddings(request: Request) -> JSONResponse:
    body = await parse_body(request, EmbeddingRequest)
    return JSONResponse(await embeddings(request).create_embeddings(body))

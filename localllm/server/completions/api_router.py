"""POST /v1/completions: parse the body, hand it to the app's `CompletionServing`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from localllm.server.auth import require_api_key
from localllm.server.completions.serving import CompletionServing
from localllm.server.serving import parse_body
from localllm.server.types import CompletionRequest

router = APIRouter(dependencies=[Depends(require_api_key)])


def completion(request: Request) -> CompletionServing:
    handler: CompletionServing = request.app.state.completion
    return handler


@router.post("/v1/completions", response_model=None)
async def create_completion(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    return await completion(request).create_completion(body, request)

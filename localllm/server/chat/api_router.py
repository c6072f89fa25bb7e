"""POST /v1/chat/completions: parse the body, hand it to the app's `ChatServing`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from localllm.server.auth import require_api_key
from localllm.server.chat.serving import ChatServing
from localllm.server.serving import parse_body
from localllm.server.types import ChatCompletionRequest

router = APIRouter(dependencies=[Depends(require_api_key)])


def chat(request: Request) -> ChatServing:
    handler: ChatServing = request.app.state.chat
    return handler


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    return await chat(request).create_chat_completion(body, request)

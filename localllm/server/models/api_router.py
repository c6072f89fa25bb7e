"""The model and admin routes: parse, hand to the app's `ModelsServing`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from localllm.server.auth import require_api_key
from localllm.server.metrics import CONTENT_TYPE
from localllm.server.models.serving import ModelsServing
from localllm.server.serving import parse_body
from localllm.server.types import DetokenizeRequest, ModelActionRequest, TokenizeRequest

router = APIRouter()
auth = [Depends(require_api_key)]


def models(request: Request) -> ModelsServing:
    handler: ModelsServing = request.app.state.models
    return handler


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    status, body = models(request).health()
    return JSONResponse(body, status_code=status)


@router.get("/metrics", dependencies=auth)
async def metrics(request: Request) -> Response:
    return Response(await models(request).metrics(), media_type=CONTENT_TYPE)


@router.get("/v1/models", dependencies=auth)
@router.get("/models", dependencies=auth)  # llama-server's router lists here
async def list_models(request: Request) -> JSONResponse:
    return JSONResponse((await models(request).list_models()).model_dump())


@router.get("/v1/models/{model:path}", dependencies=auth)
async def retrieve_model(request: Request, model: str) -> JSONResponse:
    return JSONResponse((await models(request).model(model)).model_dump())


@router.post("/models/load", dependencies=auth)
async def load_model(request: Request) -> JSONResponse:
    body = await parse_body(request, ModelActionRequest)
    return JSONResponse(await models(request).load(body))


@router.post("/models/unload", dependencies=auth)
async def unload_model(request: Request) -> JSONResponse:
    body = await parse_body(request, ModelActionRequest)
    return JSONResponse(await models(request).unload(body))


@router.post("/tokenize", dependencies=auth)
async def tokenize(request: Request) -> JSONResponse:
    body = await parse_body(request, TokenizeRequest)
    return JSONResponse({"tokens": await models(request).tokenize(body)})


@router.post("/detokenize", dependencies=auth)
async def detokenize(request: Request) -> JSONResponse:
    body = await parse_body(request, DetokenizeRequest)
    return JSONResponse({"content": await models(request).detokenize(body)})

"""Ollama's API routes: parse the body, hand it to the app's `OllamaServing`, `Catalog` or
`ModelManager` (on `app.state.ollama`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from localllm.server.auth import require_api_key
from localllm.server.ollama import types as o
from localllm.server.serving import parse_body as parse_json_body

if TYPE_CHECKING:
    from localllm.server.ollama import Ollama

# The Ollama API level these routes follow: clients that gate features on /api/version
# compare against Ollama's releases, not localllm's.
OLLAMA_API_VERSION = "0.12.0"

router = APIRouter()
auth = [Depends(require_api_key)]


async def parse_body(request: Request, model: type[o.Body]) -> o.Body:
    """Ollama's documented `curl -d '{...}'` sends a form content type; any body is read as
    JSON unless the request comes from a web page (browsers always send Origin with a POST),
    where only application/json is read, so a page cannot POST without a CORS preflight."""
    return await parse_json_body(request, model, json_only="origin" in request.headers)


def ollama(request: Request) -> Ollama:
    handler: Ollama = request.app.state.ollama
    return handler


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version() -> JSONResponse:
    from localllm import __version__

    return JSONResponse({"version": OLLAMA_API_VERSION, "localllm": __version__})


@router.api_route("/api/tags", methods=["GET", "HEAD"], dependencies=auth)
async def tags(request: Request) -> JSONResponse:
    models = await asyncio.to_thread(ollama(request).catalog.tags)
    return JSONResponse({"models": models})


@router.post("/api/show", dependencies=auth)
async def show(request: Request) -> JSONResponse:
    body = await parse_body(request, o.ModelRequest)
    catalog = ollama(request).catalog
    name = catalog.resolve(body.model_name())
    return JSONResponse(await asyncio.to_thread(catalog.show, name, body.verbose))


@router.get("/api/ps", dependencies=auth)
async def ps(request: Request) -> JSONResponse:
    return JSONResponse({"models": await asyncio.to_thread(ollama(request).catalog.ps)})


@router.post("/api/chat", dependencies=auth, response_model=None)
async def chat(request: Request) -> Response:
    body = await parse_body(request, o.ChatRequest)
    return await ollama(request).serving.chat(body, request)


@router.post("/api/generate", dependencies=auth, response_model=None)
async def generate(request: Request) -> Response:
    body = await parse_body(request, o.GenerateRequest)
    return await ollama(request).serving.generate(body, request)


@router.post("/api/embed", dependencies=auth)
async def embed(request: Request) -> JSONResponse:
    body = await parse_body(request, o.EmbedRequest)
    return JSONResponse(await ollama(request).serving.embed(body))


@router.post("/api/embeddings", dependencies=auth)
async def embeddings(request: Request) -> JSONResponse:
    body = await parse_body(request, o.EmbeddingsRequest)
    return JSONResponse(await ollama(request).serving.embeddings(body))


@router.post("/api/pull", dependencies=auth, response_model=None)
async def pull(request: Request) -> Response:
    body = await parse_body(request, o.PullRequest)
    return await ollama(request).manager.pull(body)


@router.delete("/api/delete", dependencies=auth, response_model=None)
async def delete(request: Request) -> Response:
    body = await parse_body(request, o.ModelRequest)
    return await ollama(request).manager.delete(body)


@router.post("/api/copy", dependencies=auth, response_model=None)
async def copy(request: Request) -> Response:
    body = await parse_body(request, o.CopyRequest)
    return await ollama(request).manager.copy(body)

"""What the generating endpoints share: the body parser, and `Serving`, the base of their
handlers (engine lookup, model name check, sampling parameters, limits, usage)."""

from __future__ import annotations

import json
import time
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from localllm.engine.grammar import json_object_grammar, json_schema_grammar
from localllm.engine.handle import RequestHandle
from localllm.engine.types import GenerationRequest, SamplingParams
from localllm.errors import APIError, ModelNotFoundError
from localllm.server import types as t
from localllm.server.state import AppState, ServingEngine
from localllm.server.streaming import Shaper, respond

_Body = TypeVar("_Body", bound=BaseModel)


async def parse_body(request: Request, model: type[_Body]) -> _Body:
    """The JSON object body validated into `model` (a ValidationError becomes a 400)."""
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return model.model_validate(data)


class Serving:
    """Base of the endpoint handlers; one instance per app, on `app.state`."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def engine(self) -> ServingEngine:
        """The loaded engine, or 503 while it loads or after it failed to."""
        state = self.state
        if state.engine is not None:
            return state.engine
        if state.load_error is not None:
            raise APIError(
                503,
                f"the model failed to load: {state.load_error}",
                type_="server_error",
                code="model_not_loaded",
            )
        raise APIError(
            503,
            "the model is still loading; retry shortly",
            type_="server_error",
            code="model_loading",
            retry_after_s=2,
        )

    def check_model(self, name: str | None) -> None:
        if name and name not in self.state.model_names:
            raise ModelNotFoundError(
                f"model {name!r} is not served here; this server serves "
                f"{self.state.model_id!r} (GET /v1/models)"
            )

    def check_common(self, body: t._Sampling) -> ServingEngine:
        """Checks every generating request passes before any work; the engine to run it."""
        self.check_model(body.model)
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")
        return self.engine()

    def max_tokens(self, value: int | None, param: str) -> int | None:
        limit = self.state.settings.max_tokens_limit
        if value is not None and value > limit:
            raise APIError(
                400,
                f"{param} {value} is above this server's limit of {limit} (max_tokens_limit)",
                param=param,
                code="invalid_value",
            )
        return value

    def sampling(self, body: t._Sampling) -> SamplingParams:
        defaults = SamplingParams()
        return SamplingParams(
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            min_p=defaults.min_p if body.min_p is None else body.min_p,
            repeat_penalty=body.repeat_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            grammar=_grammar(body.response_format),
        )

    def submit(
        self,
        engine: ServingEngine,
        body: t._Sampling,
        **request: Any,
    ) -> RequestHandle:
        """Queue the generation; `request` holds the GenerationRequest fields of the family."""
        return engine.submit(
            GenerationRequest(stop=body.stop_list(), sampling=self.sampling(body), **request)
        )

    def response_ids(self, prefix: str, handle: RequestHandle) -> dict[str, Any]:
        """The fields every response body of this request repeats (a shaper's first four)."""
        return {
            "id": f"{prefix}-{handle.id}",
            "created": int(time.time()),
            "model": self.state.model_id,
            "extra": self.extra(),
        }

    async def respond(
        self, request: Request, body: t._Sampling, handle: RequestHandle, shaper: Shaper
    ) -> Response:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await respond(
            request, self.state, handle, shaper, stream=body.stream, include_usage=include_usage
        )

    def extra(self) -> dict[str, Any] | None:
        """The `localllm` field of responses: the plan's warnings, when there are any."""
        return {"warnings": self.state.warnings} if self.state.warnings else None


def _grammar(response_format: t.ResponseFormat | None) -> str | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_object_grammar()
    if response_format.json_schema is None:
        raise APIError(
            400,
            "response_format.json_schema is required for type json_schema",
            param="response_format",
            code="invalid_value",
        )
    return json_schema_grammar(response_format.json_schema.schema_)

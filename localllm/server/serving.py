"""What the generating endpoints share: the body parser, and `Serving`, the base of their
handlers (engine lookup, model name check, sampling parameters, limits, usage)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from localllm.engine.grammar import check_grammar, json_object_grammar
from localllm.engine.handle import RequestHandle
from localllm.engine.types import GenerationRequest, SamplingParams
from localllm.errors import APIError, ModelNotFoundError, SettingsError
from localllm.server import types as t
from localllm.server.state import AppState, ServingEngine
from localllm.server.streaming import Shaper, respond
from localllm.tools import json_schema_grammar

_Body = TypeVar("_Body", bound=BaseModel)
_T = TypeVar("_T")


async def offload(engine: object, function: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking call for `engine` off the event loop: on the engine's own executor when
    it has one (a router's lease: that model's pool, so a flood of slow work for one model
    never holds up another model or the API's own routes), else on asyncio's default pool."""
    executor = getattr(engine, "executor", None)
    if executor is None:
        return await asyncio.to_thread(function, *args)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(function, *args))


MAX_JSON_DEPTH = 128  # nesting of a request body; deeper is refused before validation
_SURROGATE = re.compile("[\ud800-\udfff]")


async def parse_body(request: Request, model: type[_Body], *, json_only: bool = True) -> _Body:
    """The JSON object body validated into `model` (a ValidationError becomes a 400).

    Only `application/json` is read: the content types a web page may POST without a CORS
    preflight (text/plain, forms, none) are refused before the body is read. `json_only=False`
    reads any body as JSON (for callers that know the request is not from a web page).
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if json_only and media_type != "application/json":
        raise APIError(
            415,
            f"the request body must be sent as Content-Type: application/json "
            f"(got {media_type or 'none'!r})",
            code="unsupported_media_type",
        )
    body = await request.body()
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    except RecursionError:
        data = None  # nested beyond Python's parser: refused below like any deep body
    if not isinstance(data, dict):
        raise APIError(
            400,
            f"the request body must be a JSON object nested at most {MAX_JSON_DEPTH} deep",
            code="invalid_json",
        )
    _check_json(data)
    return model.model_validate(data)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_json(data: dict[str, Any]) -> None:
    """Refuse what Python's parser lets through but nothing downstream can handle: nesting
    deeper than MAX_JSON_DEPTH and lone UTF-16 surrogates (escapes like "\\ud800")."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise APIError(
                    400,
                    "the request holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                    "which is not text; send valid Unicode",
                    code="invalid_json",
                )
            continue
        if depth > MAX_JSON_DEPTH and isinstance(value, dict | list):
            raise APIError(
                400,
                f"the request body is nested more than {MAX_JSON_DEPTH} deep",
                code="invalid_json",
            )
        if isinstance(value, dict):
            stack.extend((key, depth) for key in value)
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


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

    def check_common(self, body: t._Sampling) -> None:
        """Checks every generating request passes before any work."""
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="invalid_value")

    @contextlib.asynccontextmanager
    async def use_engine(
        self, model: str | None, keep_alive: str | int | float | None, purpose: str = "generate"
    ) -> AsyncIterator[tuple[ServingEngine, str]]:
        """The engine for one request, and the model id to answer with.

        Serving a folder (a router): the named model, else the start model, loaded if needed
        and counted in flight until the generation submitted inside ends (a stream outlives
        this block). One model: its engine, if the name is one of its names.
        """
        router = self.state.router
        if router is None:
            self.check_model(model)
            if keep_alive is not None:
                raise APIError(
                    400,
                    "keep_alive applies when serving a models folder (`localllm serve` without "
                    "a model); this server holds its one model for its whole life",
                    param="keep_alive",
                    code="invalid_value",
                )
            yield self.engine(), self.state.model_id
            return
        from localllm.router import UNSET, parse_keep_alive

        try:
            keep = UNSET if keep_alive is None else parse_keep_alive(keep_alive)
        except SettingsError as exc:
            raise APIError(400, str(exc), param="keep_alive", code="invalid_value") from None
        async with router.lease(model or self.state.model_id, keep, purpose) as lease:
            yield lease, lease.model.name

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

    def sampling(self, body: t._Sampling, grammar: str | None = None) -> SamplingParams:
        """`grammar`: one the endpoint built (a forced tool call), instead of response_format's."""
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
            grammar=grammar or response_format_grammar(body.response_format),
            logit_bias=_logit_bias(body.logit_bias),
        )

    async def submit(
        self,
        engine: ServingEngine,
        body: t._Sampling,
        grammar: str | None = None,
        **request: Any,
    ) -> RequestHandle:
        """Queue the generation; `request` holds the GenerationRequest fields of the family.

        On a worker thread: turning a schema into a grammar, compiling it and tokenizing a long
        prompt each take up to seconds, and the event loop must keep answering meanwhile.
        """

        speculative = speculative_fields(body)

        def submit() -> RequestHandle:
            return engine.submit(
                GenerationRequest(
                    stop=body.stop_list(),
                    sampling=self.sampling(body, grammar),
                    timeout_s=self.state.settings.request_timeout_s,
                    spec_draft_n_max=speculative.get("n_max"),
                    spec_draft_n_min=speculative.get("n_min"),
                    **request,
                )
            )

        return await offload(engine, submit)

    def response_ids(self, prefix: str, handle: RequestHandle, model_id: str) -> dict[str, Any]:
        """The fields every response body of this request repeats (a shaper's first four)."""
        return {
            "id": f"{prefix}-{handle.id}",
            "created": int(time.time()),
            "model": model_id,
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


def _logit_bias(biases: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias}; the engine checks the ids against the vocabulary."""
    pairs = []
    for key, bias in (biases or {}).items():
        if not key.isdigit():
            raise APIError(
                400,
                f"logit_bias keys are token ids (see POST /tokenize), not {key[:40]!r}",
                param="logit_bias",
                code="invalid_value",
            )
        pairs.append((int(key), bias))
    return tuple(pairs)


def response_format_grammar(response_format: t.ResponseFormat | None) -> str | None:
    """The grammar `response_format` asks for (None for text), checked."""
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
    grammar = json_schema_grammar(response_format.json_schema.schema_)
    check_grammar(grammar)
    return grammar


def speculative_fields(body: t._Sampling) -> dict[str, int]:
    """llama-server's per-request "speculative.n_max" / "speculative.n_min" (integers 0-256);
    its "speculative.p_min" and "speculative.type" are refused (not per request here)."""
    extra = body.model_extra or {}
    fields: dict[str, int] = {}
    for key, value in extra.items():
        if not key.startswith("speculative."):
            continue
        name = key.removeprefix("speculative.")
        if name not in ("n_max", "n_min"):
            raise APIError(
                400,
                f"{key} is not supported per request; speculative.n_max and speculative.n_min "
                "are, and the server's spec_type chooses the proposer",
                param=key,
                code="unsupported_parameter",
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
            raise APIError(
                400, f"{key} must be an integer from 0 to 256", param=key, code="invalid_value"
            )
        fields[name] = value
    return fields

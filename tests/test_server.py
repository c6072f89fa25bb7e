"""The HTTP layer over a fake engine: envelopes, auth, limits, SSE, metrics, loading, serve()."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from localllm.errors import SettingsError
from localllm.loading import plan_engine_config
from localllm.server import create_app
from localllm.server.app import WARNING_HEADER
from localllm.server.run import check_bind, is_loopback
from localllm.settings import Settings
from tests.conftest import FakeEngine

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
WARNING = "expect ~3 tok/s: 10 layers on the CPU"


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_keys": [KEY, "second-key"],
        "max_body_bytes": 2048,
        "max_tokens_limit": 100,
        "cors_origins": ["http://ok.example"],
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def client(fake_engine: FakeEngine) -> Iterator[TestClient]:
    app = create_app(
        _settings(),
        fake_engine,
        model_id="tiny",
        model_names={"tiny.gguf"},
        plan_summary={"n_gpu_layers": 0},
        warnings=[WARNING],
    )
    with TestClient(app, base_url="http://localhost") as test_client:
        yield test_client


def _chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "a b c"}]}
    body.update(fields)
    return body


def _assert_envelope(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


def test_health_is_open_and_carries_plan_and_warnings(client: TestClient) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["plan"] == {"n_gpu_layers": 0}
    assert body["warnings"] == [WARNING]
    assert body["slots_idle"] == 4


def test_models_lists_the_model_with_the_localllm_field(client: TestClient) -> None:
    body = client.get("/v1/models", headers=AUTH).json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "tiny"
    assert card["localllm"]["warnings"] == [WARNING]
    assert card["localllm"]["plan"] == {"n_gpu_layers": 0}


def test_chat_completion_with_usage_warning_header_and_field(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    response = client.post("/v1/chat/completions", json=_chat(temperature=0.3), headers=AUTH)
    assert response.status_code == 200
    assert response.headers[WARNING_HEADER] == WARNING
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "user: a b c"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 4,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    assert body["localllm"] == {"warnings": [WARNING]}
    request = fake_engine.requests[-1]
    assert request.sampling.temperature == 0.3
    assert request.sampling.top_k == 40  # unset fields take the engine's defaults
    assert request.add_special is False  # the chat template wrote BOS


def test_max_completion_tokens_and_stop_reach_the_engine(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    response = client.post(
        "/v1/chat/completions",
        json=_chat(max_completion_tokens=2, stop="END", seed=7),
        headers=AUTH,
    )
    assert response.json()["choices"][0]["finish_reason"] == "length"
    request = fake_engine.requests[-1]
    assert request.max_tokens == 2
    assert request.stop == ("END",)
    assert request.sampling.seed == 7


def test_text_parts_are_joined(client: TestClient) -> None:
    parts = [{"type": "text", "text": "x "}, {"type": "text", "text": "y"}]
    body = _chat(messages=[{"role": "user", "content": parts}])
    response = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.json()["choices"][0]["message"]["content"] == "user: x y"


def _sse_events(response: Any) -> list[str]:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[len("data: ") :] for line in lines]


def test_chat_stream_is_sse_ending_with_done_and_usage(client: TestClient) -> None:
    body = _chat(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "user: a b c"
    finish = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finish[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8


def test_completion_string_list_and_stream(client: TestClient, fake_engine: FakeEngine) -> None:
    response = client.post(
        "/v1/completions", json={"prompt": ["one two three"], "max_tokens": 2}, headers=AUTH
    )
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "one two"
    assert body["choices"][0]["finish_reason"] == "length"
    assert fake_engine.requests[-1].add_special is True
    body = {"prompt": "p q", "stream": True, "logprobs": 1}
    with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as streamed:
        events = _sse_events(streamed)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert texts == "p q"
    with_logprobs = [c for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    assert with_logprobs[0]["choices"][0]["logprobs"]["token_logprobs"] == [-0.5]


def test_chat_logprobs_shape(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", json=_chat(logprobs=True, top_logprobs=2), headers=AUTH
    )
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert content[0]["logprob"] == -0.5
    assert content[0]["bytes"] == list(b"user:")


def test_response_formats_become_grammars(client: TestClient, fake_engine: FakeEngine) -> None:
    client.post(
        "/v1/chat/completions", json=_chat(response_format={"type": "json_object"}), headers=AUTH
    )
    assert "root" in (fake_engine.requests[-1].sampling.grammar or "")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    client.post(
        "/v1/chat/completions",
        json=_chat(
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        ),
        headers=AUTH,
    )
    assert '"\\"n\\""' in (fake_engine.requests[-1].sampling.grammar or "")
    _assert_envelope(
        client.post(
            "/v1/chat/completions",
            json=_chat(response_format={"type": "json_schema"}),
            headers=AUTH,
        ),
        400,
    )


def test_tokenize_and_detokenize(client: TestClient) -> None:
    tokens = client.post("/tokenize", json={"content": "ab cde"}, headers=AUTH).json()["tokens"]
    assert tokens == [2, 3]
    content = client.post("/detokenize", json={"tokens": [1, 2]}, headers=AUTH).json()["content"]
    assert content == "x xx"


def test_metrics_are_prometheus_text_on_a_private_registry(client: TestClient) -> None:
    client.post("/v1/chat/completions", json=_chat(), headers=AUTH)
    text = client.get("/metrics", headers=AUTH).text
    for name in (
        "localllm_requests_total",
        "localllm_time_to_first_token_seconds_bucket",
        "localllm_busy_slots",
        "localllm_queue_length",
        "localllm_kv_cells_used",
        "localllm_prompt_tokens_per_second",
        "localllm_decode_tokens_per_second",
        "localllm_generated_tokens_total",
    ):
        assert name in text
    assert 'localllm_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    # A second app has its own registry: no duplicate-registration error, its own counts.
    other = create_app(_settings(api_keys=[]), FakeEngine())
    with TestClient(other, base_url="http://localhost") as other_client:
        assert "localllm_requests_total{" not in other_client.get("/metrics").text


# ---------------------------------------------------------------------------- errors


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        content=b'{"messages": [',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    _assert_envelope(response, 400, "invalid_json")
    response = client.post("/v1/chat/completions", content=b"[1, 2]", headers=JSON_AUTH)
    _assert_envelope(response, 400, "invalid_json")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 7}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 2}, "n"),
        ({"max_tokens": 101}, "max_tokens"),
    ],
)
def test_bad_fields_are_400_naming_the_field(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    error = _assert_envelope(
        client.post("/v1/chat/completions", json=_chat(**fields), headers=AUTH), 400
    )
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_404(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=_chat(model="gpt-9"), headers=AUTH)
    _assert_envelope(response, 404, "model_not_found")
    # the file name works as well as the id
    assert (
        client.post("/v1/chat/completions", json=_chat(model="tiny.gguf"), headers=AUTH).status_code
        == 200
    )


def test_context_length_exceeded_is_400(client: TestClient) -> None:
    long = " ".join(["w"] * 100)
    body = _chat(messages=[{"role": "user", "content": long}])
    error = _assert_envelope(
        client.post("/v1/chat/completions", json=body, headers=AUTH), 400, "context_length_exceeded"
    )
    assert error["param"] == "messages"


def test_queue_full_is_503_with_retry_after(client: TestClient, fake_engine: FakeEngine) -> None:
    fake_engine.queue_full = True
    response = client.post("/v1/chat/completions", json=_chat(), headers=AUTH)
    _assert_envelope(response, 503, "queue_full")
    assert response.headers["Retry-After"] == "3"


def test_body_over_the_limit_is_413_by_length_and_by_counted_bytes(client: TestClient) -> None:
    big = json.dumps(_chat(messages=[{"role": "user", "content": "x" * 5000}])).encode()
    response = client.post("/v1/chat/completions", content=big, headers=JSON_AUTH)
    _assert_envelope(response, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    response = client.post("/v1/chat/completions", content=chunks(), headers=JSON_AUTH)
    _assert_envelope(response, 413, "request_too_large")


def test_api_key_is_required_and_any_configured_key_works(client: TestClient) -> None:
    _assert_envelope(client.post("/v1/chat/completions", json=_chat()), 401, "invalid_api_key")
    wrong = {"Authorization": "Bearer nope"}
    _assert_envelope(client.get("/v1/models", headers=wrong), 401, "invalid_api_key")
    _assert_envelope(client.get("/v1/models", headers={"Authorization": KEY}), 401)
    second = {"Authorization": "Bearer second-key"}
    assert client.get("/v1/models", headers=second).status_code == 200
    assert client.get("/health").status_code == 200  # health stays open
    _assert_envelope(client.get("/metrics"), 401)


def test_unknown_route_and_method_use_the_envelope(client: TestClient) -> None:
    _assert_envelope(client.get("/v1/nothing", headers=AUTH), 404)
    _assert_envelope(client.get("/v1/chat/completions", headers=AUTH), 405)


def test_cors_allows_only_configured_origins(client: TestClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = client.options(
        "/v1/chat/completions", headers={**preflight, "Origin": "http://ok.example"}
    )
    assert ok.headers.get("access-control-allow-origin") == "http://ok.example"
    bad = client.options(
        "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in bad.headers


def test_server_still_answers_after_errors(client: TestClient) -> None:
    client.post("/v1/chat/completions", content=b"{", headers=JSON_AUTH)
    client.post("/v1/chat/completions", json=_chat(model="x"), headers=AUTH)
    assert client.post("/v1/chat/completions", json=_chat(), headers=AUTH).status_code == 200


# ---------------------------------------------------------------------------- loading, serve()


def test_health_is_503_while_loading_then_200() -> None:
    release = threading.Event()

    def factory() -> FakeEngine:
        release.wait(10)
        return FakeEngine()

    app = create_app(_settings(api_keys=[]), engine_factory=factory, model_id="slow")
    with TestClient(app, base_url="http://localhost") as test_client:
        assert test_client.get("/health").status_code == 503
        response = test_client.post("/v1/chat/completions", json=_chat(model="slow"))
        _assert_envelope(response, 503, "model_loading")
        assert "Retry-After" in response.headers
        release.set()
        for _ in range(200):
            if test_client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.01)
        assert test_client.get("/health").json()["status"] == "ok"
        engine = app.state.localllm.engine
    assert engine.closed  # the app loaded it, so the app closed it


def test_a_failed_load_is_reported() -> None:
    def factory() -> FakeEngine:
        from localllm.errors import ModelLoadError

        raise ModelLoadError("no such file")

    app = create_app(_settings(api_keys=[]), engine_factory=factory)
    with TestClient(app, base_url="http://localhost") as test_client:
        for _ in range(200):
            if app.state.localllm.loaded.is_set():
                break
            threading.Event().wait(0.01)
        body = test_client.get("/health").json()
        assert body == {"status": "error", "error": "no such file"}
        response = test_client.post("/v1/completions", json={"prompt": "x"})
        _assert_envelope(response, 503, "model_not_loaded")


def test_create_app_needs_exactly_one_engine_source() -> None:
    with pytest.raises(ValueError):
        create_app(_settings())
    with pytest.raises(ValueError):
        create_app(_settings(), FakeEngine(), engine_factory=FakeEngine)


def test_public_bind_needs_a_key_or_explicit_consent() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    check_bind(Settings(host="127.0.0.1"))
    with pytest.raises(SettingsError, match="API key"):
        check_bind(Settings(host="0.0.0.0"))
    check_bind(Settings(host="0.0.0.0", api_keys=["k"]))
    check_bind(Settings(host="0.0.0.0", allow_public_bind=True))


def test_plan_engine_config_follows_the_fitter(tmp_path: Path) -> None:
    from tests.gguf_factory import LLAMA_7B, write_gguf

    model = write_gguf(tmp_path / "m.gguf", LLAMA_7B)
    settings = Settings(n_ctx=2048, parallel=2, type_k="q8_0", threads=3, queue_size=5)
    config, summary, warnings = plan_engine_config(model, settings)
    assert config.n_ctx == 4096 and config.n_ctx_slot == 2048
    assert config.n_gpu_layers == 0  # this machine's llama.cpp build is CPU-only
    assert (config.type_k, config.n_threads, config.queue_size) == ("q8_0", 3, 5)
    assert summary["source"] == "fit" and summary["n_ctx_per_slot"] == 2048
    # a 7B Q4_K_M on 2 CPU cores is far below the interactive floor: the users are told
    assert any("below the 10 tok/s floor" in w for w in warnings)
    host = summary["devices"][-1]
    assert host["weights_bytes"] > 3.5e9 and host["kv_bytes"] > 0


def test_a_bug_is_a_500_envelope_and_counted(
    client: TestClient, fake_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(request: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fake_engine, "submit", broken)
    response = client.post("/v1/chat/completions", json=_chat(), headers=AUTH)
    _assert_envelope(response, 500, "internal_error")
    assert "a bug" not in response.text  # details stay in the log
    text = client.get("/metrics", headers=AUTH).text
    assert 'localllm_requests_total{endpoint="/v1/chat/completions",status="500"} 1.0' in text


def test_a_stream_cancelled_by_shutdown_ends_with_an_event_and_done(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    fake_engine.hold = True
    threading.Timer(0.3, fake_engine.cancel_all).start()
    with client.stream(
        "POST", "/v1/chat/completions", json=_chat(stream=True), headers=AUTH
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "cancelled"

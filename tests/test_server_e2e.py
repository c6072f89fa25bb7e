"""End to end: the official openai client against a real uvicorn server and the embedded model."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import API_KEY, OTHER_API_KEY, UvicornThread

pytestmark = pytest.mark.model

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "gemma-3-270m"


def _busy_slots(server: UvicornThread) -> float:
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for line in text.splitlines():
        if line.startswith("localllm_busy_slots "):
            return float(line.split()[1])
    raise AssertionError("no localllm_busy_slots in /metrics")


def _wait_idle(server: UvicornThread, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _busy_slots(server) == 0:
            return True
        time.sleep(0.05)
    return False


def _envelope(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    return dict(error)


def test_chat_completion(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage is not None
    assert response.usage.prompt_tokens > 5
    assert 1 <= response.usage.completion_tokens <= 8


def test_text_completion(openai_client: openai.OpenAI) -> None:
    response = openai_client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert response.choices[0].text.strip()
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 8


def test_streaming_chat_with_usage(openai_client: openai.OpenAI) -> None:
    # Warm-up: afterwards the prompt is cached in a slot, so both requests below take the same
    # path (restore the checkpoint, decode the prompt's last tokens). A cold prompt and a reused
    # one differ in batch shapes, and llama.cpp's logits are not bit-identical across those (as
    # llama-server warns for cache_prompt): a near-tie could flip a greedy token between them.
    openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=1,
        temperature=0,
    )
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish_reason = None
    usage = None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish_reason = chunk.choices[0].finish_reason or finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces)
    assert finish_reason == "length"
    assert usage is not None and usage.completion_tokens == 12
    # The streamed text equals the non-streamed text for the same greedy request.
    whole = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12,
        temperature=0,
    )
    assert whole.choices[0].message.content == "".join(pieces)


def test_stop_sequence(openai_client: openai.OpenAI) -> None:
    full = (
        openai_client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0
        )
        .choices[0]
        .text
    )
    stop = full.split()[2]
    cut = openai_client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_same_seed_same_text(openai_client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        response = openai_client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a line about the sea."}],
            max_tokens=16,
            temperature=1.0,
            top_p=1.0,
            seed=seed,
        )
        return response.choices[0].message.content or ""

    ask(7)  # warm the prompt cache so the compared runs see the same batch shapes
    assert ask(7) == ask(7)
    assert ask(7) != ask(8)


def test_json_schema_mode_parses(openai_client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    response = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON with name and age."}],
        max_tokens=48,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
    )
    value = json.loads(response.choices[0].message.content or "")
    assert set(value) == {"name", "age"}


def test_json_object_mode_is_constrained(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Reply with a JSON object."}],
        max_tokens=48,
        seed=1,
        response_format={"type": "json_object"},
    )
    text = response.choices[0].message.content or ""
    assert text.lstrip().startswith("{")
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_logprobs(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) >= 1
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in content)


def test_four_streams_progress_at_once(
    openai_client: openai.OpenAI, live_server: UvicornThread
) -> None:
    first_token: dict[int, float] = {}
    finished: dict[int, float] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            stream = openai_client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Tell story number {i}."}],
                max_tokens=24,
                temperature=0.8,
                seed=i,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first_token.setdefault(i, time.monotonic())
            finished[i] = time.monotonic()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(first_token) == 4 and len(finished) == 4
    # Every stream received a token before any stream finished: decoded together, not in turn.
    assert max(first_token.values()) < min(finished.values())
    assert _wait_idle(live_server)


def test_client_disconnect_frees_the_slot(live_server: UvicornThread) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 300,
        "stream": True,
    }
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "POST", live_server.url + "/v1/chat/completions", json=body, headers=AUTH
        ) as r:
            lines = r.iter_lines()
            for line in lines:
                if '"content":"' in line and '"content":""' not in line:
                    break
            assert _busy_slots(live_server) == 1
        # leaving the block closes the connection mid-stream
    assert _wait_idle(live_server, 3.0)


def test_non_streaming_disconnect_frees_the_slot(live_server: UvicornThread) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.url + "/v1/completions", json=body, headers=AUTH, timeout=0.5)
    assert _wait_idle(live_server, 3.0)


def test_second_chat_turn_reuses_the_prompt_cache(openai_client: openai.OpenAI) -> None:
    history = [
        {"role": "system", "content": "You are a helpful assistant who knows about llamas. " * 4},
        {"role": "user", "content": "What do llamas eat?"},
    ]
    first = openai_client.chat.completions.create(
        model=MODEL,
        messages=history,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    history += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And where do they live?"},
    ]
    second = openai_client.chat.completions.create(
        model=MODEL,
        messages=history,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert first.usage is not None and second.usage is not None
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached is not None and cached >= first.usage.prompt_tokens - 1


# ---------------------------------------------------------------------------- bad inputs


def test_bad_inputs_answer_their_status_with_the_envelope(live_server: UvicornThread) -> None:
    url = live_server.url
    chat = url + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(timeout=30) as client:
        _envelope(
            client.post(
                chat, content=b"{nope", headers={**AUTH, "Content-Type": "application/json"}
            ),
            400,
            "invalid_json",
        )
        error = _envelope(client.post(chat, json={**ok, "temperature": "warm"}, headers=AUTH), 400)
        assert error["param"] == "temperature"
        _envelope(
            client.post(chat, json={**ok, "model": "gpt-4o"}, headers=AUTH), 404, "model_not_found"
        )
        long = {**ok, "messages": [{"role": "user", "content": "llama " * 700}]}
        _envelope(client.post(chat, json=long, headers=AUTH), 400, "context_length_exceeded")
        _envelope(client.post(chat, json={**ok, "max_tokens": 401}, headers=AUTH), 400)
        big = {**ok, "messages": [{"role": "user", "content": "x" * 70_000}]}
        _envelope(client.post(chat, json=big, headers=AUTH), 413, "request_too_large")
        _envelope(client.post(chat, json=ok), 401, "invalid_api_key")
        _envelope(client.post(chat, json=ok, headers={"Authorization": "Bearer wrong"}), 401)
        second_key = {"Authorization": f"Bearer {OTHER_API_KEY}"}
        assert client.post(chat, json=ok, headers=second_key).status_code == 200
        assert client.get(url + "/health").json()["status"] == "ok"


def test_streamed_body_over_the_limit_is_413_on_a_real_socket(live_server: UvicornThread) -> None:
    # A chunked body has no Content-Length: the limit must count the bytes as they arrive.
    payload = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"y" * 70_000 + b'"}]}'
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=10) as sock:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        try:
            for i in range(0, len(payload), 8192):
                piece = payload[i : i + 8192]
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may close once it has answered
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 413")


def test_queue_full_is_503_with_retry_after(live_server: UvicornThread) -> None:
    # 4 slots + a queue of 2 are taken by 6 long streams; the 7th request is turned away.
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "stream": True}
    clients = [httpx.Client(timeout=30) for _ in range(6)]
    streams = []
    try:
        for client in clients:
            stream = client.stream(
                "POST", live_server.url + "/v1/completions", json=body, headers=AUTH
            )
            response = stream.__enter__()
            assert response.status_code == 200
            streams.append(stream)
        response = httpx.post(
            live_server.url + "/v1/completions",
            json={**body, "stream": False, "max_tokens": 2},
            headers=AUTH,
        )
        _envelope(response, 503, "queue_full")
        assert int(response.headers["Retry-After"]) >= 1
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
        for client in clients:
            client.close()
    assert _wait_idle(live_server, 5.0)


def test_server_still_answers_after_all_that(
    openai_client: openai.OpenAI, live_server: UvicornThread
) -> None:
    response = openai_client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert response.usage is not None and response.usage.completion_tokens == 2
    health = httpx.get(live_server.url + "/health").json()
    assert health["slots_processing"] == 0 and health["queue_length"] == 0
    metrics = httpx.get(live_server.url + "/metrics", headers=AUTH).text
    assert 'status="413"' in metrics and 'status="503"' in metrics

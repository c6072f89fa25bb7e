"""`serve` over a models folder, on loopback: models by name, /v1/models with state and plan,
POST /models/load and /models/unload, /v1/embeddings in OpenAI's shape, keep_alive, the wrong
kind of request refused, per-model metrics, and `localllm ps`."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from localllm.cli import main as cli_main
from localllm.router import Router
from localllm.settings import Settings
from tests.conftest import API_KEY, UvicornThread
from tests.gguf_factory import write_bert


@pytest.fixture(scope="module")
def folder_server(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path
) -> Iterator[UvicornThread]:
    from localllm.server import create_app

    models = tmp_path_factory.mktemp("served-folder")
    shutil.copyfile(embedded_model_path, models / "gemma-a.gguf")
    write_bert(models / "tiny-bert.gguf")
    write_bert(models / "tiny-reranker.gguf", pooling_type=4)
    settings = Settings(
        models_dir=models,
        model="gemma-a",  # the start model (serve() passes none and gets the default)
        n_ctx=1024,
        parallel=2,
        threads=1,
        n_batch=256,
        n_ubatch=256,
        keep_alive="5m",
        max_tokens_limit=64,
    )
    router = Router(settings)
    app = create_app(settings, router=router, model_id=router.start_model_name())
    server = UvicornThread(app).start()
    try:
        health = httpx.Client(base_url=server.url, timeout=120)
        for _ in range(600):  # the start model loads in the background
            if health.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(folder_server: UvicornThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=folder_server.url, timeout=120) as c:
        yield c


def cards(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {card["id"]: card for card in client.get("/v1/models").json()["data"]}


def test_models_list_every_file_with_state_capabilities_and_plan(client: httpx.Client) -> None:
    listed = cards(client)
    assert set(listed) == {"gemma-a", "tiny-bert", "tiny-reranker"}
    gemma = listed["gemma-a"]
    assert gemma["status"] == {"value": "loaded"}  # loaded at start
    assert gemma["localllm"]["capabilities"] == ["completion", "chat", "embeddings"]
    plan = gemma["localllm"]["plan"]
    assert plan["tokens_per_conversation"] == 1024 and plan["n_parallel"] == 2
    assert plan["devices"][-1]["name"] == "host"
    loaded = gemma["localllm"]["loaded"]
    assert loaded["rss_bytes"] > 100 * 2**20 and loaded["devices"]["host"] > 0
    assert listed["tiny-bert"]["localllm"]["capabilities"] == ["embeddings"]
    assert listed["tiny-bert"]["status"]["value"] in ("loaded", "unloaded")
    assert client.get("/models").json() == client.get("/v1/models").json()  # llama-server's path
    assert client.get("/v1/models/tiny-reranker").json()["localllm"]["capabilities"] == []
    assert client.get("/v1/models/nope").status_code == 404


def test_chat_names_its_model_and_streams(client: httpx.Client) -> None:
    body = {
        "model": "gemma-a",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "gemma-a"
    text = answer.json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["model"] for c in chunks} == {"gemma-a"}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == text
    unnamed = {k: v for k, v in body.items() if k != "model"}
    no_model = client.post("/v1/chat/completions", json=unnamed)
    assert no_model.json()["model"] == "gemma-a"  # the start model answers unnamed requests


def test_tool_calls_through_a_worker(client: httpx.Client) -> None:
    """The worker answers the model's tool syntax and renders tools across the pipe."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 12}},
                "required": ["zone"],
            },
        },
    }
    body = {
        "model": "gemma-a",
        "messages": [{"role": "user", "content": "Time in Tokyo?"}],
        "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "temperature": 0,
        "max_tokens": 40,
    }
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    assert isinstance(json.loads(call["function"]["arguments"])["zone"], str)


def test_load_and_unload_endpoints_take_llama_server_s_shapes(client: httpx.Client) -> None:
    assert client.post("/models/load", json={"model": "tiny-bert"}).json() == {"success": True}
    assert cards(client)["tiny-bert"]["status"] == {"value": "loaded"}
    assert client.post("/models/unload", json={"model": "tiny-bert"}).json() == {"success": True}
    assert cards(client)["tiny-bert"]["status"] == {"value": "unloaded"}
    missing = client.post("/models/load", json={"model": "no-such-model"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    bad = client.post("/models/load", json={"model": "tiny-bert", "keep_alive": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"


def test_embeddings_in_openai_s_shapes(client: httpx.Client) -> None:
    texts = ["first text", "a second, longer text"]
    floats = client.post("/v1/embeddings", json={"model": "tiny-bert", "input": texts})
    assert floats.status_code == 200, floats.text
    body = floats.json()
    assert body["object"] == "list" and body["model"] == "tiny-bert"
    assert [d["index"] for d in body["data"]] == [0, 1]
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0

    packed = client.post(
        "/v1/embeddings",
        json={"model": "tiny-bert", "input": texts, "encoding_format": "base64"},
    ).json()
    decoded = np.array(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]]
    )
    np.testing.assert_allclose(decoded, vectors, atol=1e-7)

    one = client.post("/v1/embeddings", json={"model": "tiny-bert", "input": texts[0]}).json()
    np.testing.assert_allclose(one["data"][0]["embedding"], vectors[0], atol=1e-5)
    tokens = client.post("/tokenize", json={"model": "tiny-bert", "content": texts[0]})
    ids = tokens.json()["tokens"]
    by_ids = client.post("/v1/embeddings", json={"model": "tiny-bert", "input": [ids]}).json()
    assert len(by_ids["data"]) == 1


def test_embeddings_work_through_the_openai_client(folder_server: UvicornThread) -> None:
    import openai

    client = openai.OpenAI(base_url=folder_server.url + "/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="gemma-a", input=["Hello world", "Goodbye"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 640
    assert abs(np.linalg.norm(result.data[0].embedding) - 1.0) < 1e-4
    assert result.usage.prompt_tokens > 0


def test_the_wrong_kind_of_request_is_a_clear_400(client: httpx.Client) -> None:
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "tiny-bert", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 400 and "embedding model" in chat.json()["error"]["message"]
    rerank = client.post("/v1/embeddings", json={"model": "tiny-reranker", "input": "a query"})
    assert rerank.status_code == 400 and "reranker" in rerank.json()["error"]["message"]
    dims = client.post("/v1/embeddings", json={"model": "tiny-bert", "input": "x", "dimensions": 8})
    assert dims.status_code == 400 and dims.json()["error"]["param"] == "dimensions"
    empty = client.post("/v1/embeddings", json={"model": "tiny-bert", "input": []})
    assert empty.status_code == 400


def test_keep_alive_zero_unloads_after_the_answer(client: httpx.Client) -> None:
    body = {"model": "tiny-bert", "input": "x", "keep_alive": 0}
    assert client.post("/v1/embeddings", json=body).status_code == 200
    deadline = time.monotonic() + 120  # the unload runs in the background: however slowly
    while time.monotonic() < deadline:
        if cards(client)["tiny-bert"]["status"]["value"] == "unloaded":
            break
        time.sleep(0.05)
    assert cards(client)["tiny-bert"]["status"] == {"value": "unloaded"}


def test_metrics_carry_the_model_label(client: httpx.Client) -> None:
    client.post("/models/load", json={"model": "tiny-bert"})
    text = client.get("/metrics").text
    assert 'localllm_model_loaded{model="gemma-a"} 1.0' in text
    assert 'localllm_model_loads_total{model="tiny-bert"}' in text
    assert 'localllm_generated_tokens_total{model="gemma-a"}' in text
    assert 'localllm_time_to_first_token_seconds_count{model="gemma-a"}' in text


def test_localllm_ps_lists_the_loaded_models(folder_server: UvicornThread) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["ps", folder_server.url]) == 0
    table = out.getvalue()
    assert table.splitlines()[0].split() == ["NAME", "DEVICES", "RSS", "CONTEXT", "UNTIL"]
    assert "gemma-a" in table and "host" in table and "1024 x2" in table


def test_one_model_server_embeds_and_refuses_folder_requests(
    live_server: UvicornThread, engine: Any
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=live_server.url, headers=headers, timeout=60) as c:
        answer = c.post("/v1/embeddings", json={"input": ["Hello world"]})
        assert answer.status_code == 200, answer.text
        vector = answer.json()["data"][0]["embedding"]
        np.testing.assert_allclose(vector, engine.embed(["Hello world"]).vectors[0], atol=1e-5)
        load = c.post("/models/load", json={"model": "gemma-3-270m"})
        assert load.status_code == 400 and "without a model" in load.json()["error"]["message"]
        keep = c.post("/v1/embeddings", json={"input": "x", "keep_alive": "5m"})
        assert keep.status_code == 400 and keep.json()["error"]["param"] == "keep_alive"


def test_a_worker_killed_mid_stream_ends_that_stream_and_the_server_goes_on(
    client: httpx.Client,
) -> None:
    import os
    import signal

    pid = cards(client)["gemma-a"]["localllm"]["loaded"]["pid"]
    body = {"model": "gemma-a", "prompt": "Tell me a long story", "max_tokens": 64, "stream": True}
    events: list[Any] = []
    with client.stream("POST", "/v1/completions", json=body) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                events.append("[DONE]")
                break
            event = json.loads(line[6:])
            events.append(event)
            if len(events) == 2:
                os.kill(pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "model_crashed", events[-2]
    assert "SIGKILL" in events[-2]["error"]["message"]
    status = cards(client)["gemma-a"]["status"]
    assert status["value"] == "unloaded" and status["failed"] and status["exit_code"] == -9
    embed = client.post("/v1/embeddings", json={"model": "tiny-bert", "input": "still up"})
    assert embed.status_code == 200  # the other model goes on
    again = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
    assert again.status_code == 200  # loaded again on demand
    assert cards(client)["gemma-a"]["status"] == {"value": "loaded"}

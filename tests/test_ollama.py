"""Ollama's API (/api/*) on the real server and the embedded model, through the official `ollama`
Python client, LangChain's `langchain-ollama`, and raw NDJSON over httpx.

Shapes, not answer content: the embedded model is a small base model, and may be replaced.
One model (`live_server`, with API keys) and a models folder (a router, no keys) are served.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from localllm.settings import Settings, split_host_port
from tests.conftest import API_KEY, UvicornThread
from tests.tiny_images import png

pytestmark = pytest.mark.model
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FEW = {"num_predict": 8, "temperature": 0.0}  # short, repeatable answers


@pytest.fixture
def client(live_server: UvicornThread) -> ollama.Client:
    return ollama.Client(host=live_server.url, headers=AUTH, timeout=300)


@pytest.fixture
def raw(live_server: UvicornThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, headers=AUTH, timeout=300) as c:
        yield c


def check_done(final: Any) -> None:
    """The last object of any generation: done, its reason, Ollama's counters in ns."""
    assert final.done is True
    assert final.done_reason in ("stop", "length")
    assert final.total_duration > 0 and final.eval_duration >= 0
    assert final.load_duration >= 0 and final.prompt_eval_duration >= 0
    assert final.prompt_eval_count > 0 and final.eval_count > 0
    assert final.total_duration >= final.eval_duration


# ------------------------------------------------------------------------------ one model


def test_version_list_show_ps(client: ollama.Client, raw: httpx.Client) -> None:
    version = raw.get("/api/version").json()
    assert version["version"].count(".") == 2 and "localllm" in version
    assert raw.head("/api/tags").status_code == 200

    listed = client.list().models
    assert [m.model for m in listed] == ["gemma-3-270m"]
    model = listed[0]
    assert model.size and model.size > 100_000_000 and model.digest and model.modified_at
    assert model.details is not None and model.details.family == "gemma3"
    assert model.details.format == "gguf" and model.details.quantization_level == "Q4_K_M"
    assert model.details.parameter_size and model.details.parameter_size.endswith("M")

    shown = client.show("gemma-3-270m:latest")  # Ollama's clients add the tag
    assert shown.capabilities is not None
    assert {"completion", "tools", "embedding"} <= set(shown.capabilities)
    assert "thinking" not in shown.capabilities and "vision" not in shown.capabilities
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelinfo["general.parameter_count"] > 100_000_000
    assert shown.modelinfo["tokenizer.ggml.tokens"] is None  # the vocabulary only when verbose
    assert shown.template and "<start_of_turn>" in shown.template
    assert shown.parameters and "num_ctx 512" in shown.parameters.splitlines()

    running = client.ps().models
    assert [m.model for m in running] == ["gemma-3-270m"]
    assert running[0].context_length == 512 and running[0].expires_at is not None


def test_chat_not_streamed_and_streamed(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    answer = client.chat("gemma-3-270m", messages=messages, options=FEW)
    assert answer.message.role == "assistant" and isinstance(answer.message.content, str)
    assert answer.model == "gemma-3-270m" and answer.created_at
    check_done(answer)
    assert answer.eval_count is not None and answer.eval_count <= 8

    chunks = list(client.chat("gemma-3-270m", messages=messages, options=FEW, stream=True))
    assert len(chunks) >= 2
    assert all(c.done is False for c in chunks[:-1]) and chunks[-1].done is True
    check_done(chunks[-1])
    text = "".join(c.message.content or "" for c in chunks)
    assert text == answer.message.content  # temperature 0: the same answer both ways


def test_generate_templated_and_raw(client: ollama.Client) -> None:
    answer = client.generate("gemma-3-270m", "The sky is", system="Be brief.", options=FEW)
    assert isinstance(answer.response, str)
    check_done(answer)
    chunks = list(client.generate("gemma-3-270m", "The sky is", raw=True, options=FEW,
                                  stream=True))
    assert chunks[-1].done is True and all(c.done is False for c in chunks[:-1])
    check_done(chunks[-1])
    assert isinstance("".join(c.response or "" for c in chunks), str)
    loaded = client.generate("gemma-3-270m", "")  # Ollama's "load the model"
    assert loaded.done is True and loaded.done_reason == "load"


def test_ndjson_on_the_wire(raw: httpx.Client) -> None:
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}],
            "options": FEW}  # no "stream": Ollama streams by default
    with raw.stream("POST", "/api/chat", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["done"] is True and not any(line["done"] for line in lines[:-1])
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration", "done_reason"):
        assert key in lines[-1], key
    assert all(line["message"]["role"] == "assistant" for line in lines)
    one = raw.post("/api/generate", json={"model": "gemma-3-270m", "prompt": "Hi",
                                          "stream": False, "options": FEW})
    assert one.status_code == 200 and one.json()["done"] is True and "response" in one.json()


def test_embed_and_embeddings(client: ollama.Client) -> None:
    vectors = client.embed("gemma-3-270m", input=["first text", "second text"])
    assert len(vectors.embeddings) == 2 and len(vectors.embeddings[0]) == 640
    assert abs(sum(x * x for x in vectors.embeddings[0]) - 1.0) < 1e-3  # normalised
    assert vectors.prompt_eval_count and vectors.prompt_eval_count > 0
    truncated = client.embed("gemma-3-270m", input="word " * 2000, truncate=True)
    assert len(truncated.embeddings[0]) == 640
    old = client.embeddings("gemma-3-270m", prompt="first text")
    assert len(old.embedding) == 640


def test_format_schema_through_the_grammar(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answer = client.chat("gemma-3-270m", messages=[{"role": "user", "content": "Is it ok?"}],
                         format=schema, options={"num_predict": 48, "temperature": 0.0})
    assert answer.done_reason == "stop"
    assert isinstance(json.loads(answer.message.content or "")["ok"], bool)
    loose = client.generate("gemma-3-270m", "A JSON object:", format="json",
                            options={"num_predict": 48, "temperature": 0.0})
    if loose.done_reason == "stop":
        assert isinstance(json.loads(loose.response or ""), dict)


def get_weather(city: str) -> str:
    """Get the weather in a city.

    Args:
      city: The city's name
    """
    return f"sunny in {city}"


def test_tools_and_a_tool_round_trip(client: ollama.Client) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    answer = client.chat("gemma-3-270m", messages=[question], tools=[get_weather],
                         options={"num_predict": 48, "temperature": 0.0})
    check_done(answer)
    for call in answer.message.tool_calls or []:  # whether it calls is the model's choice
        assert call.function.name == "get_weather"
        assert isinstance(call.function.arguments, dict)
    # A conversation with a call and its result, as Ollama's clients send it back.
    messages = [
        question,
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    streamed = list(client.chat("gemma-3-270m", messages=messages, tools=[get_weather],
                                options=FEW, stream=True))
    check_done(streamed[-1])


def refused(call: Any, status: int, *words: str) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        call()
    assert caught.value.status_code == status, caught.value.error
    for word in words:
        assert word in caught.value.error, caught.value.error


def test_what_cannot_be_honoured_is_a_400_naming_it(client: ollama.Client) -> None:
    say = [{"role": "user", "content": "Hi"}]

    def chat(**kw: Any) -> Any:
        return client.chat("gemma-3-270m", messages=say, **kw)

    refused(lambda: chat(options={"mirostat": 2}), 400, "options.mirostat")
    refused(lambda: chat(options={"num_gpu": 10}), 400, "options.num_gpu", "load-time")
    refused(lambda: chat(options={"no_such_option": 1}), 400, "options.no_such_option")
    refused(lambda: chat(options={"num_ctx": 1_000_000}), 400, "num_ctx", "512")
    refused(lambda: chat(options={"temperature": 9.0}), 400, "options.temperature")
    refused(lambda: chat(think=True), 400, "does not support thinking")
    refused(lambda: chat(keep_alive="5m"), 400, "keep_alive")
    refused(lambda: client.chat("gemma-3-270m", messages=[
        {"role": "user", "content": "What is this?", "images": [png(8, 8)]}]), 400,
        "no vision projector")
    refused(lambda: client.generate("gemma-3-270m", "x", suffix="y"), 400, "suffix")
    refused(lambda: client.chat("gemma-3-270m", messages=[
        {"role": "user", "content": "Hi", "thinking": "hmm"}]), 400, "messages[0].thinking")
    refused(lambda: client.chat("no-such-model", messages=say), 404, "no-such-model")
    # Accepted: what changes nothing, and what localllm does anyway.
    ok = chat(options={**FEW, "num_ctx": 256, "mirostat": 0, "seed": -1, "stop": ["\n\n"]},
              think=False, keep_alive=-1)
    assert ok.done is True


def test_errors_in_ollamas_shape(live_server: UvicornThread) -> None:
    no_key = httpx.post(live_server.url + "/api/chat", json={"model": "x", "messages": []})
    assert no_key.status_code == 401 and isinstance(no_key.json()["error"], str)
    unknown = httpx.get(live_server.url + "/api/nothing", headers=AUTH)
    assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)
    extra = httpx.post(live_server.url + "/api/show", headers=AUTH,
                       json={"model": "gemma-3-270m", "bogus": 1})
    assert extra.status_code == 400 and "bogus" in extra.json()["error"]
    openai_shape = httpx.post(live_server.url + "/v1/chat/completions", json={})
    assert isinstance(openai_shape.json()["error"], dict)  # /v1 keeps OpenAI's envelope


def test_langchain_ollama(live_server: UvicornThread) -> None:
    from langchain_core.messages import AIMessage
    from langchain_ollama import ChatOllama, OllamaEmbeddings
    from pydantic import BaseModel

    kwargs = {"headers": AUTH, "timeout": 300}
    chat = ChatOllama(model="gemma-3-270m", base_url=live_server.url, num_predict=8,
                      temperature=0.0, client_kwargs=kwargs)
    message = chat.invoke("Say hello.")
    assert isinstance(message, AIMessage) and isinstance(message.content, str)
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] > 0
    pieces = list(chat.stream("Say hello."))
    assert pieces and "".join(str(p.content) for p in pieces) == message.content
    class Answer(BaseModel):
        ok: bool

    structured = ChatOllama(model="gemma-3-270m", base_url=live_server.url, num_predict=48,
                            temperature=0.0, client_kwargs=kwargs)
    parsed = structured.with_structured_output(Answer, method="json_schema").invoke("Is it ok?")
    assert isinstance(parsed, Answer)  # `format` with the schema: the grammar made it valid
    embeddings = OllamaEmbeddings(model="gemma-3-270m", base_url=live_server.url,
                                  client_kwargs=kwargs)
    assert len(embeddings.embed_query("hello")) == 640


# ------------------------------------------------------------------------------ a models folder


@pytest.fixture(scope="module")
def folder(
    tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path
) -> Iterator[tuple[UvicornThread, Path]]:
    from localllm.router import Router
    from localllm.server import create_app

    models = tmp_path_factory.mktemp("ollama-folder")
    shutil.copyfile(embedded_model_path, models / "gemma-a.gguf")
    settings = Settings(models_dir=models, model="gemma-a", n_ctx=1024, parallel=1, threads=1,
                        n_batch=256, n_ubatch=256, keep_alive="5m", max_tokens_limit=64)
    router = Router(settings)
    app = create_app(settings, router=router, model_id=router.start_model_name())
    server = UvicornThread(app).start()
    try:
        deadline = time.monotonic() + 300
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the start model did not load"
            time.sleep(0.1)
        yield server, models
    finally:
        server.stop()


def test_folder_ps_has_the_routers_figures_and_keep_alive(
    folder: tuple[UvicornThread, Path],
) -> None:
    server, _ = folder
    client = ollama.Client(host=server.url, timeout=300)
    client.chat("gemma-a", messages=[{"role": "user", "content": "Hi"}], options=FEW,
                keep_alive="10m")
    (model,) = client.ps().models
    rows = {row["model"]: row for row in server.app.state.localllm.router.ps()}
    assert model.size == rows["gemma-a"]["planned_bytes"] > 100_000_000
    assert model.size_vram == sum(b for d, b in rows["gemma-a"]["devices"].items() if d != "host")
    assert model.context_length == 1024
    assert model.expires_at is not None
    left = model.expires_at.timestamp() - time.time()
    assert 60 < left <= 600  # keep_alive 10m, counting down from the answer's end
    # num_ctx above the plan: planned again by the fitter and reloaded, as Ollama reloads.
    bigger = client.chat("gemma-a", messages=[{"role": "user", "content": "Hi"}],
                         options={**FEW, "num_ctx": 2048})
    check_done(bigger)
    assert bigger.load_duration is not None and bigger.load_duration > 0  # it waited for it
    (model,) = client.ps().models
    assert model.context_length == 2048
    assert model.size is not None and model.size > rows["gemma-a"]["planned_bytes"]  # more KV
    refused(lambda: client.chat("gemma-a", messages=[{"role": "user", "content": "Hi"}],
                                options={"num_ctx": 10_000_000}), 400, "num_ctx", "does not fit")
    assert client.ps().models[0].context_length == 2048  # a refused plan changes nothing
    unloaded = client.chat("gemma-a", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload" and client.ps().models == []
    loaded = client.generate("gemma-a", "")
    assert loaded.done_reason == "load" and [m.model for m in client.ps().models] == ["gemma-a"]


def test_pull_with_progress_copy_delete(
    folder: tuple[UvicornThread, Path], embedded_model_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.fake_hub import FakeHub, running_hub

    server, models = folder
    hub = FakeHub()
    hub.add("google/gemma-3-270m-GGUF", embedded_model_path)
    client = ollama.Client(host=server.url, timeout=300)
    with running_hub(hub):
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        refused(lambda: client.pull("llama3.2"), 400, "not a hub name")
        progress = list(client.pull("google/gemma-3-270m-GGUF", stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    sizes = [(p.completed, p.total) for p in progress if p.total]
    assert sizes and sizes[-1][0] == sizes[-1][1] == embedded_model_path.stat().st_size
    assert [done for done, _ in sizes] == sorted(done for done, _ in sizes)
    pulled = models / embedded_model_path.name
    assert pulled.stat().st_size == embedded_model_path.stat().st_size
    assert pulled.stem in [m.model for m in client.list().models]
    # The name it was pulled by answers for it, as in Ollama.
    shown = client.show("google/gemma-3-270m-GGUF")
    assert shown.details is not None and shown.details.family == "gemma3"

    assert client.copy("gemma-a", "gemma-b").status == "success"
    assert {"gemma-a", "gemma-b"} <= {m.model for m in client.list().models}
    assert client.delete("gemma-b").status == "success"
    assert client.delete(pulled.stem).status == "success"
    names = {m.model for m in client.list().models}
    assert "gemma-b" not in names and pulled.stem not in names and not pulled.exists()
    refused(lambda: client.delete("gemma-b"), 404, "gemma-b")


def test_host_in_ollamas_form() -> None:
    assert split_host_port("127.0.0.1:11434") == ("127.0.0.1", 11434)
    assert split_host_port("http://0.0.0.0:11434") == ("0.0.0.0", 11434)
    assert split_host_port("[::1]:11434") == ("::1", 11434)
    assert split_host_port("::1") == ("::1", None)
    assert split_host_port("localhost") == ("localhost", None)
    settings = Settings(host="127.0.0.1:11434")
    assert (settings.host, settings.port) == ("127.0.0.1", 11434)
    with pytest.raises(ValueError, match="names port 11434"):
        Settings(host="127.0.0.1:11434", port=8080)


# ------------------------------------------------------------------------------ no model needed


def test_think_maps_onto_the_chat_paths_fields() -> None:
    from localllm.errors import APIError
    from localllm.server.ollama.serving import think_fields
    from localllm.server.types import ChatCompletionRequest

    assert think_fields(None, True, "m") == {}
    assert think_fields(False, False, "m") == {}  # nothing to turn off
    with pytest.raises(APIError, match='"m" does not support thinking'):
        think_fields(True, False, "m")
    declared = ChatCompletionRequest.model_fields
    if "chat_template_kwargs" in declared:  # the chat path can switch thinking
        assert think_fields(False, True, "m")["chat_template_kwargs"] == {
            "enable_thinking": False
        }
        high = think_fields("high", True, "m")
        assert high == {"chat_template_kwargs": {"enable_thinking": True}}
        if "reasoning_effort" in declared:  # only for a template that reads an effort
            assert think_fields("high", True, "m", takes_effort=True)["reasoning_effort"] == "high"
    else:  # it cannot yet: refused, not ignored
        with pytest.raises(APIError, match="cannot switch"):
            think_fields(True, True, "m")


def test_reasoning_content_becomes_thinking() -> None:
    from types import SimpleNamespace

    from localllm.server.ollama.shapes import OllamaShaper

    delta = SimpleNamespace(content="4", reasoning_content="2+2", tool_calls=None)
    chunk = SimpleNamespace(choices=[SimpleNamespace(delta=delta, logprobs=None)])

    class Inner:
        model = "m"

        def text_chunk(self, event: Any) -> Any:
            return chunk

    shaper = OllamaShaper(Inner(), "m", "chat", time.perf_counter(), 0.0)  # type: ignore[arg-type]
    from localllm.engine.types import TextEvent

    body = shaper.piece(TextEvent("4"))
    assert body is not None
    assert body["message"] == {"role": "assistant", "content": "4", "thinking": "2+2"}
    shaper.kind = "generate"
    body = shaper.piece(TextEvent("4"))
    assert body is not None and body["response"] == "4" and body["thinking"] == "2+2"


def test_curl_style_bodies_are_read_unless_from_a_page(live_server: UvicornThread) -> None:
    # Ollama's docs use `curl -d '{...}'`, which sends a form content type.
    body = json.dumps({"model": "gemma-3-270m"})
    form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    assert httpx.post(live_server.url + "/api/show", content=body, headers=form).status_code == 200
    page = {**form, "Origin": "http://evil.example"}
    refused_page = httpx.post(live_server.url + "/api/show", content=body, headers=page)
    assert refused_page.status_code == 415


def test_capabilities_from_the_header(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from localllm.server.ollama.catalog import Catalog
    from tests.gguf_factory import LLAMA_7B, write_bert, write_gguf

    thinking = "{% if enable_thinking %}<think>{% endif %}{{ messages[0]['content'] }}"
    paths = {
        "thinker": write_gguf(tmp_path / "thinker.gguf", LLAMA_7B, chat_template=thinking),
        "plain": write_gguf(tmp_path / "plain.gguf", LLAMA_7B),
        "bert": write_bert(tmp_path / "bert.gguf"),
        "reranker": write_bert(tmp_path / "reranker.gguf", pooling_type=4),
    }
    found = {}
    for name, path in paths.items():
        state = SimpleNamespace(router=None, model_id=name, model_names={name}, engine=None)
        found[name] = Catalog(state, path).capabilities(name)  # type: ignore[arg-type]
    assert found["thinker"] == ["completion", "tools", "embedding", "thinking"]
    assert found["plain"] == ["completion", "tools", "embedding"]
    assert found["bert"] == ["embedding"]
    assert found["reranker"] == []
    state = SimpleNamespace(router=None, model_id="plain", model_names={"plain"}, engine=None,
                            public=False)
    shown = Catalog(state, paths["plain"]).show("plain", verbose=False)  # type: ignore[arg-type]
    assert shown["details"]["family"] == "llama"
    assert shown["details"]["parameter_size"].endswith("B")
    assert "<|im_start|>" in shown["template"]  # no template in the file: ChatML, as rendered


def test_thinking_capability_from_real_templates() -> None:
    from localllm.server.ollama.catalog import thinks
    from tests.conftest import REPO

    folder = REPO / "tests/data/templates"
    expected = {
        "Qwen-Qwen3-0.6B.jinja": True,
        "Qwen3.5-4B.jinja": True,
        "openai-gpt-oss-120b.jinja": True,  # harmony's analysis channel
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": True,
        "Qwen-Qwen2.5-7B-Instruct.jinja": False,
        "meta-llama-Llama-3.1-8B-Instruct.jinja": False,
        "google-gemma-2-2b-it.jinja": False,
    }
    assert {name: thinks((folder / name).read_text()) for name in expected} == expected


def test_serve_on_ollamas_address_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from localllm.cli import main as cli_main

    received: list[Settings] = []
    monkeypatch.setattr("localllm.server.run.serve", received.append)
    (tmp_path / "none.toml").write_text("")
    monkeypatch.setenv("LOCALLLM_CONFIG", str(tmp_path / "none.toml"))
    assert cli_main(["serve", "--host", "127.0.0.1:11434"]) == 0
    monkeypatch.setenv("LOCALLLM_HOST", "http://127.0.0.1:11434")
    assert cli_main(["serve"]) == 0
    assert [(s.host, s.port) for s in received] == [("127.0.0.1", 11434)] * 2


def wait_until(condition: Any, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_goes_away_frees_the_slot(live_server: UvicornThread) -> None:
    engine = live_server.app.state.localllm.engine
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "A long story."}],
            "options": {"num_predict": 300}}
    with httpx.Client(timeout=300) as c, c.stream(
        "POST", live_server.url + "/api/chat", json=body, headers=AUTH
    ) as response:
        first = json.loads(next(response.iter_lines()))
        assert first["done"] is False
        assert engine.stats().busy_slots == 1
    # leaving the block closed the connection mid-stream
    assert wait_until(lambda: engine.stats().busy_slots == 0)


def test_busy_and_failed_streams_in_ollamas_shape(fake_engine: Any) -> None:
    from localllm.server import create_app

    server = UvicornThread(create_app(Settings(), fake_engine, model_id="fake")).start()
    try:
        say = {"model": "fake", "messages": [{"role": "user", "content": "one two three"}]}
        fake_engine.queue_full = True
        busy = httpx.post(server.url + "/api/chat", json=say, timeout=60)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "3"
        assert busy.json() == {"error": "all slots busy"}
        fake_engine.queue_full, fake_engine.hold = False, True
        with httpx.stream("POST", server.url + "/api/chat", json=say, timeout=60) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines))["message"]["content"] == "user:"  # the fake echoes
            fake_engine.cancel_all()  # the server stopping under a running stream
            rest = [json.loads(line) for line in lines if line]
        assert rest[-1] == {"error": "the server is shutting down"}
    finally:
        server.stop()


def test_think_reaches_the_template_and_thinking_comes_back(tmp_path: Path) -> None:
    """A tiny random-weight Qwen3.5 with Qwen3.5's real chat template: its generation prompt
    opens <think> unless enable_thinking is false, so `think` decides whether the text comes
    back as message.thinking or as content."""
    import subprocess
    import sys

    from localllm.engine import Engine, EngineConfig
    from localllm.server import create_app
    from tests.conftest import REPO
    from tests.tiny_models import write_qwen35

    template = (REPO / "tests/data/templates/Qwen3.5-4B.jinja").read_text()
    bare = write_qwen35(tmp_path / "bare.gguf").path
    model = tmp_path / "thinker.gguf"
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(bare), str(model),
         "--chat-template", template, "--force"],
        check=True, capture_output=True, timeout=120,
    )
    config = EngineConfig(model_path=model, n_ctx=1024, n_parallel=1, n_threads=1, n_batch=256,
                          n_ubatch=256)
    with Engine.load(config) as engine:
        server = UvicornThread(create_app(Settings(), engine, model_id="thinker",
                                          model_path=model)).start()
        try:
            client = ollama.Client(host=server.url, timeout=300)
            assert "thinking" in (client.show("thinker").capabilities or [])
            say = [{"role": "user", "content": "hi"}]
            thought = client.chat("thinker", messages=say, think=True, options=FEW)
            assert thought.message.thinking and not thought.message.content
            streamed = list(client.chat("thinker", messages=say, think="high", options=FEW,
                                        stream=True))
            assert "".join(c.message.thinking or "" for c in streamed)
            plain = client.chat("thinker", messages=say, think=False, options=FEW)
            assert not plain.message.thinking and plain.message.content
            generated = client.generate("thinker", "hi", think=True, options=FEW)
            assert generated.thinking and not generated.response
        finally:
            server.stop()

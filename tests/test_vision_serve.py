"""Serving images: a tiny random-weight Gemma 3 with its tiny SigLIP projector, both loaded by
llama.cpp for real, behind the real app on loopback. The answers are garbage; the paths are not:
usage counts the image's tokens, hostile images are 400s before anything decodes them, URL images
are fetched only from allowed hosts, a second turn reuses the image's KV cells without encoding it
again, and another slot's stream goes on while an image is encoded."""

from __future__ import annotations

import asyncio
import base64
import http.server
import struct
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from localllm.engine import GenerationRequest
from localllm.errors import RequestError
from localllm.server.images import load_images
from localllm.server.types import ChatMessage
from localllm.settings import Settings
from localllm.vision import read_projector
from localllm.vision.images import MEDIA_MARKER, ImageLimits, check_image
from tests import tiny_vision as tv
from tests.conftest import UvicornThread
from tests.tiny_images import png
from tests.tiny_models import write_gemma3_swa

MODEL = "tiny-vision"
# Random weights may pick their end-of-generation token (id 2) at once: keep them talking.
TALK = {"temperature": 0, "logit_bias": {"2": -100}}


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = "What is in this picture?") -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": url}},
        ],
    }


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("vision-serve")
    model = folder / "tiny-gemma3-F16.gguf"
    projector = folder / "mmproj-tiny-gemma3-F16.gguf"
    write_gemma3_swa(model)
    tv.write_gemma3_mmproj(projector)
    return model, projector


@pytest.fixture(scope="module")
def image_tokens(vision_files: tuple[Path, Path]) -> int:
    return read_projector(vision_files[1]).image_tokens


@pytest.fixture(scope="module")
def vision_engine(vision_files: tuple[Path, Path]) -> Iterator[Any]:
    from localllm.engine import Engine, EngineConfig

    model, projector = vision_files
    config = EngineConfig(
        model_path=model, n_ctx=2048, n_parallel=2, n_threads=1, n_batch=256, n_ubatch=64,
        mmproj_path=projector,
    )
    with Engine.load(config) as engine:
        yield engine


def _serve(engine: Any, settings: Settings) -> UvicornThread:
    from localllm.server import create_app

    app = create_app(settings, engine, model_id=MODEL, plan_summary={"source": "test"})
    return UvicornThread(app).start()


@pytest.fixture(scope="module")
def server(vision_engine: Any) -> Iterator[UvicornThread]:
    """Default settings (no image URL hosts), but a small max_image_bytes to test the bound."""
    running = _serve(vision_engine, Settings(max_image_bytes=200_000))
    yield running
    running.stop()


@pytest.fixture
def client(server: UvicornThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _post(server: UvicornThread, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


# ---------------------------------------------------------------------------- the happy path


def test_a_png_data_url_is_answered_and_its_tokens_counted(
    client: openai.OpenAI, vision_engine: Any, image_tokens: int
) -> None:
    image = png(40, 30, seed=1)
    text_only = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is in this picture?"}],
        max_tokens=3,
        extra_body=TALK,
    )
    before = vision_engine.stats().images_encoded_total
    answer = client.chat.completions.create(
        model=MODEL, messages=[image_message(data_url(image))], max_tokens=3, extra_body=TALK
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and text_only.usage is not None
    assert answer.usage.completion_tokens == 3
    # the image's tokens, plus mtmd's begin/end-of-image text, on top of the same text
    assert answer.usage.prompt_tokens >= text_only.usage.prompt_tokens + image_tokens
    assert vision_engine.stats().images_encoded_total == before + 1


@pytest.mark.parametrize("answer_tokens", [4, 250], ids=["short", "past-the-window"])
def test_the_second_turn_reuses_the_image_without_encoding_it(
    client: openai.OpenAI, vision_engine: Any, image_tokens: int, answer_tokens: int
) -> None:
    """A long answer slides the model's 32-token window past the prompt's end (the small
    sliding-window cache): the next turn then restores a context checkpoint, still after the
    image."""
    image = png(32, 32, seed=2 + answer_tokens)
    first = [image_message(data_url(image), "Describe it.")]
    before = vision_engine.stats().images_encoded_total
    restored = vision_engine.stats().checkpoints_restored_total
    one = client.chat.completions.create(
        model=MODEL, messages=first, max_tokens=answer_tokens, extra_body=TALK
    )
    assert vision_engine.stats().images_encoded_total == before + 1
    second = [
        *first,
        {"role": "assistant", "content": one.choices[0].message.content or ""},
        {"role": "user", "content": "And the colours?"},
    ]
    two = client.chat.completions.create(
        model=MODEL, messages=second, max_tokens=4, extra_body=TALK
    )
    assert vision_engine.stats().images_encoded_total == before + 1  # not encoded again
    metrics = httpx.get(str(client.base_url).replace("/v1/", "/metrics"), timeout=60).text
    assert f"localllm_images_encoded_total {float(before + 1)}" in metrics
    assert two.usage is not None and two.usage.prompt_tokens_details is not None
    cached = two.usage.prompt_tokens_details.cached_tokens or 0
    assert cached > image_tokens
    if answer_tokens > 32:
        assert vision_engine.stats().checkpoints_restored_total > restored


def test_two_images_in_one_message(
    client: openai.OpenAI, vision_engine: Any, image_tokens: int
) -> None:
    before = vision_engine.stats().images_encoded_total
    message = image_message(data_url(png(20, 20, seed=3)))
    message["content"].append({"type": "image_url", "image_url": {"url": data_url(png(8, 8))}})
    answer = client.chat.completions.create(
        model=MODEL, messages=[message], max_tokens=2, extra_body=TALK
    )
    assert answer.usage is not None and answer.usage.prompt_tokens > 2 * image_tokens
    assert vision_engine.stats().images_encoded_total == before + 2


def test_a_stream_goes_on_while_another_slot_sends_an_image(
    server: UvicornThread,
    client: openai.OpenAI,
    vision_engine: Any,
    image_tokens: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the image's encode has started it is held until the other slot's stream has produced
    10 more tokens: that only happens if the stream decodes while the image is being encoded (no
    timing assumed)."""
    media = vision_engine.media
    encode = media._encode
    encoding = threading.Event()
    advanced = threading.Event()
    held: list[bool] = []

    def gated(chunk: Any, n_tokens: int) -> Any:
        encoding.set()
        held.append(advanced.wait(120))
        return encode(chunk, n_tokens)

    monkeypatch.setattr(media, "_encode", gated)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell a long story."}],
        max_tokens=400,
        stream=True,
        extra_body=TALK,
    )
    finish: list[str | None] = []
    first = threading.Event()

    def read() -> None:
        after = 0
        for chunk in stream:
            if chunk.choices:
                finish.append(chunk.choices[0].finish_reason)
                first.set()
                if encoding.is_set():
                    after += 1
                    if after >= 10:
                        advanced.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(120)
    answer = _post(
        server,
        {"model": MODEL, "messages": [image_message(data_url(png(24, 24, seed=4)))],
         "max_tokens": 2, **TALK},
    )
    reader.join(300)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] > image_tokens
    assert held == [True]  # the stream went 10 tokens on while the image was encoding
    assert not reader.is_alive() and finish[-1] == "length"


# ---------------------------------------------------------------------------- hostile images


def _refused(response: httpx.Response, words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert words in error["message"], error["message"]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        # a decompression bomb: a valid header declaring 100000 x 100000 pixels
        (data_url(png(40, 30)[:16] + struct.pack(">II", 100_000, 100_000) + png(40, 30)[24:]),
         "max_image_pixels"),
        (data_url(png(40, 30)[:20]), "truncated or damaged"),  # cut inside the header
        (data_url(png(40, 30)[:60]), "cannot be decoded"),  # header fine, pixel data cut
        (data_url(png(40, 30), "image/jpeg"), "declared image/jpeg but its bytes are image/png"),
        (data_url(b"GIF89a" + bytes(40), "image/gif"), "not a PNG, JPEG or WebP"),
        ("data:image/png;base64,not*base64!", "not valid base64"),
        (data_url(png(300, 300)), "max_image_bytes of 200000"),
        ("file:///etc/passwd", "base64 data URL"),
        ("http://127.0.0.1:1/x.png", "SSRF"),
    ],
    ids=["bomb", "cut-header", "cut-data", "wrong-mime", "gif", "not-base64", "too-big", "file",
         "url-by-default"],
)
def test_hostile_images_are_400s(server: UvicornThread, url: str, words: str) -> None:
    _refused(_post(server, {"model": MODEL, "messages": [image_message(url)]}), words)


def test_image_part_shapes_are_checked(server: UvicornThread) -> None:
    url = data_url(png(8, 8))
    detail = image_message(url)
    detail["content"][1]["image_url"]["detail"] = "low"
    _refused(_post(server, {"model": MODEL, "messages": [detail]}), "detail 'low'")
    auto = image_message(url)
    auto["content"][1]["image_url"]["detail"] = "auto"
    ok = _post(server, {"model": MODEL, "messages": [auto], "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    system = {"role": "system", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    _refused(
        _post(server, {"model": MODEL, "messages": [system, image_message(url)]}),
        "only user messages carry images",
    )
    marker = image_message(url, "see <__media__> here")
    _refused(_post(server, {"model": MODEL, "messages": [marker]}), "<__media__>")


def test_a_jpeg_and_a_webp_header_are_read() -> None:
    # a baseline JPEG's SOF0 after an APP0 segment; a lossless WebP's VP8L header
    jpeg = (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
            b"\xff\xc0\x00\x11\x08\x01\xe0\x02\x80\x03" + bytes(30))
    image = check_image(jpeg, "image/jpeg", ImageLimits(), "x")
    assert (image.width, image.height) == (640, 480)
    bits = (100 - 1) | (50 - 1) << 14
    webp = b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8L" + struct.pack("<I", 10) + b"\x2f"
    webp += struct.pack("<I", bits) + bytes(8)
    image = check_image(webp, "image/webp", ImageLimits(), "x")
    assert (image.width, image.height) == (100, 50)
    with pytest.raises(RequestError, match="max_image_pixels"):
        check_image(jpeg, None, ImageLimits(max_pixels=1000), "x")


# ---------------------------------------------------------------------------- URLs


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A local HTTP server with /a.png and /big.png."""
    files = {"/a.png": png(16, 16, seed=5), "/big.png": png(400, 400)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"localhost:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_images_are_refused_by_default() -> None:
    assert Settings().image_url_hosts == []
    message = ChatMessage.model_validate(image_message("https://example.com/cat.png"))
    with pytest.raises(RequestError, match="fetches no image URLs"):
        asyncio.run(load_images([message], Settings()))


def test_url_images_from_an_allowed_host(vision_engine: Any, image_host: str) -> None:
    running = _serve(vision_engine, Settings(image_url_hosts=["localhost"]))
    try:
        def ask(url: str) -> httpx.Response:
            body = {"model": MODEL, "messages": [image_message(url)], "max_tokens": 1, **TALK}
            return httpx.post(running.url + "/v1/chat/completions", json=body, timeout=120)

        ok = ask(f"http://{image_host}/a.png")
        assert ok.status_code == 200, ok.text
        _refused(ask(f"http://{image_host}/missing.png"), "HTTP 404")
        port = image_host.split(":")[1]
        _refused(ask(f"http://127.0.0.1:{port}/a.png"), "not in this server's image_url_hosts")
    finally:
        running.stop()


# ---------------------------------------------------------------------------- Ollama, no projector


def test_ollama_images_in_chat_and_generate(server: UvicornThread, image_tokens: int) -> None:
    client = ollama.Client(host=server.url, timeout=300)
    options = {"temperature": 0, "num_predict": 2}
    image = png(20, 20, seed=6)
    answer = client.chat(
        MODEL, messages=[{"role": "user", "content": "What is it?", "images": [image]}],
        options=options,
    )
    assert answer.prompt_eval_count is not None and answer.prompt_eval_count > image_tokens
    generated = client.generate(MODEL, "What is it?", images=[image], options=options)
    assert generated.prompt_eval_count is not None
    assert generated.prompt_eval_count > image_tokens
    with pytest.raises(ollama.ResponseError) as refused:
        not_an_image = base64.b64encode(b"not an image").decode()
        client.chat(MODEL, messages=[{"role": "user", "content": "x", "images": [not_an_image]}])
    assert refused.value.status_code == 400 and "PNG, JPEG or WebP" in str(refused.value)


def test_an_image_to_a_model_without_a_projector(vision_files: tuple[Path, Path]) -> None:
    from localllm.engine import Engine, EngineConfig

    config = EngineConfig(model_path=vision_files[0], n_ctx=512, n_parallel=1, n_threads=1)
    with Engine.load(config) as engine:
        running = _serve(engine, Settings())
        try:
            response = httpx.post(
                running.url + "/v1/chat/completions",
                json={"model": MODEL, "messages": [image_message(data_url(png(8, 8)))]},
                timeout=120,
            )
        finally:
            running.stop()
    _refused(response, "tiny-gemma3-F16.gguf has no vision projector")
    assert "--mmproj" in response.json()["error"]["message"]


def test_serve_loads_the_projector_beside_the_model(
    vision_files: tuple[Path, Path], image_tokens: int, tmp_path: Path
) -> None:
    """`serve()` of the models folder in its own process (the router, a worker per model): the
    plan's projector (`mmproj` auto) loads with the model and the image is answered."""
    from tests.conftest import served_process

    settings = (
        f"model={str(vision_files[0])!r}, threads=1, n_ctx=1024, parallel=1, n_batch=256, "
        "n_ubatch=256"
    )
    with served_process(settings, vision_files[0], tmp_path) as (_, url):
        models = httpx.get(url + "/v1/models", timeout=60).json()["data"]
        [model] = [m["id"] for m in models]
        body = {"model": model, "messages": [image_message(data_url(png(12, 12)))],
                "max_tokens": 2, **TALK}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=240)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > image_tokens


def test_a_projector_found_beside_a_model_that_llama_cpp_refuses(
    embedded_model_path: Path, vision_files: tuple[Path, Path]
) -> None:
    """`mmproj` auto pairs by file name only: a projector made for another model (its width
    differs) leaves the model serving text, and an image request says why; a projector given
    by path fails the load."""
    from localllm.engine import Engine, EngineConfig
    from localllm.errors import ModelLoadError

    config = EngineConfig(
        model_path=embedded_model_path, n_ctx=512, n_parallel=1, n_threads=1,
        mmproj_path=vision_files[1], mmproj_required=False,
    )
    with Engine.load(config) as engine:
        assert engine.media is None
        answer = engine.generate("Hello", max_tokens=1)
        assert answer.usage.completion_tokens == 1
        with pytest.raises(RequestError, match="did not load: .*mmproj-tiny-gemma3"):
            engine.submit(GenerationRequest(prompt=MEDIA_MARKER + " hi", images=(png(8, 8),)))
    with pytest.raises(ModelLoadError, match="could not load the vision projector"):
        Engine.load(replace(config, mmproj_required=True))


def test_a_cut_never_lands_inside_an_image() -> None:
    from localllm.engine.media import ImageSpan, MediaPrompt, image_key

    key = image_key(b"image")
    assert key < 0 and key == image_key(b"image") and key != image_key(b"other")
    spans = [ImageSpan(5, 16, key, None, True), ImageSpan(30, 16, key - 1, None, True)]
    prompt = MediaPrompt([1] * 5 + [key] * 16 + [1] * 9 + [key - 1] * 16 + [1] * 4, spans, None)
    assert [prompt.align(n) for n in (0, 5, 6, 20, 21, 29, 31, 46)] == [0, 5, 5, 5, 21, 29, 30, 46]
    assert prompt.checkpoints((10, 26, 40, 46)) == (5, 26, 30, 46)
    assert prompt.at(5) is spans[0] and prompt.at(6) is None
    assert prompt.next_start(6) == 30 and prompt.next_start(31) is None


def test_a_served_folder_sends_images_to_the_model_worker(
    vision_files: tuple[Path, Path], image_tokens: int, tmp_path: Path
) -> None:
    """The router's path: the model in a worker process, its chat rendered there with the
    image markers, the images pickled across with the request."""
    from localllm.router import Router
    from localllm.server import create_app

    settings = Settings(
        models_dir=vision_files[0].parent, model="tiny-gemma3-F16", n_ctx=1024, parallel=1,
        threads=1, n_batch=256, n_ubatch=256,
    )
    router = Router(settings)
    running = UvicornThread(
        create_app(settings, router=router, model_id=router.start_model_name())
    ).start()
    try:
        body = {"model": "tiny-gemma3-F16", "messages": [image_message(data_url(png(10, 10)))],
                "max_tokens": 2, **TALK}
        response = httpx.post(running.url + "/v1/chat/completions", json=body, timeout=240)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] > image_tokens
        card = httpx.get(running.url + "/v1/models", timeout=60).json()["data"][0]
        assert "vision" in card["localllm"]["capabilities"]
    finally:
        running.stop()


@pytest.fixture(scope="module")
def qwen_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Qwen2.5-VL's projector beside an M-RoPE text model of its width (the tiny Qwen3.5, a
    Gated DeltaNet hybrid: its reuse goes through context checkpoints)."""
    from tests.tiny_models import QWEN35_SPEC, write_qwen35

    folder = tmp_path_factory.mktemp("vision-qwen")
    write_qwen35(folder / "qwen.gguf")
    tv.write_qwen25vl_mmproj(folder / "mmproj-qwen.gguf", projection_dim=QWEN35_SPEC.n_embd)
    return folder / "qwen.gguf", folder / "mmproj-qwen.gguf"


def _reference_top(engine: Any, text: str, image: bytes) -> list[tuple[int, float]]:
    """The next token's top 3 (id, logprob) by llama.cpp's own path: the prompt's chunks through
    `mtmd_helper_eval_chunks` on a fresh context of the same model."""
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd
    import numpy as np

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 1024, 256, 256
    params.n_threads = params.n_threads_batch = 1
    ctx = llama_cpp.llama_init_from_model(engine.backend.model, params)
    prompt = engine.media.prompt(text, [image], False, True)
    try:
        n_past = llama_cpp.llama_pos(0)
        status = mtmd.mtmd_helper_eval_chunks(
            engine.media.ctx, ctx, prompt.chunks, 0, 0, 256, True, ctypes.byref(n_past)
        )
        assert status == 0
        n_vocab = engine.backend.n_vocab
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        logits = logits.astype(np.float64)
        logprobs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        return [(int(t), float(logprobs[t])) for t in np.argsort(-logprobs)[:3]]
    finally:
        prompt.free()
        llama_cpp.llama_free(ctx)


@pytest.mark.parametrize(
    ("family", "n_batch"), [("gemma3", 256), ("qwen2.5vl", 256), ("qwen2.5vl", 8)]
)
def test_the_engine_decodes_images_as_llama_cpp_does(
    family: str, n_batch: int, vision_files: tuple[Path, Path], qwen_files: tuple[Path, Path]
) -> None:
    """The next token's distribution after a prompt with an image, from the engine's scheduler
    (image encoded on its worker, embeddings decoded into the slot; M-RoPE positions for
    Qwen2.5-VL; an image of more tokens than n_batch in several batches), equals llama.cpp's own
    mtmd helper's."""
    from localllm.engine import Engine, EngineConfig, SamplingParams

    model, projector = vision_files if family == "gemma3" else qwen_files
    config = EngineConfig(
        model_path=model, n_ctx=1024, n_parallel=1, n_threads=1, n_batch=n_batch,
        n_ubatch=n_batch, mmproj_path=projector,
    )
    image = png(60, 40, seed=7)  # Qwen2.5-VL: 12 tokens
    with Engine.load(config) as engine:
        assert engine.media is not None and engine.media.uses_mrope == (family != "gemma3")
        text, _ = engine.chat_render([{"role": "user", "content": f"Look: {MEDIA_MARKER} What?"}])
        assert isinstance(text, str)
        request = GenerationRequest(
            prompt=text, images=(image,), add_special=False, max_tokens=1, logprobs=3,
            sampling=SamplingParams(temperature=0),
        )
        ours = engine.submit(request).result().logprobs[0].top
        reference = _reference_top(engine, text, image)
        pieces = [engine.backend.token_bytes(t, True) for t, _ in reference]
    assert [top.token_bytes for top in ours] == pieces
    for top, (_, logprob) in zip(ours, reference, strict=True):
        assert abs(top.logprob - logprob) < 0.05


def test_an_m_rope_image_is_reused_on_the_next_turn(qwen_files: tuple[Path, Path]) -> None:
    """Qwen2.5-VL: the image takes max(width, height) positions for its tokens; the next turn
    restores a context checkpoint after it (a hybrid model) and does not encode it again."""
    from localllm.engine import Engine, EngineConfig, SamplingParams

    model, projector = qwen_files
    config = EngineConfig(
        model_path=model, n_ctx=2048, n_parallel=1, n_threads=1, n_ubatch=64,
        mmproj_path=projector,
    )
    talk = SamplingParams(temperature=0, logit_bias=((2, -100.0),))
    image = png(60, 40, seed=8)
    with Engine.load(config) as engine:
        first = [{"role": "user", "content": f"{MEDIA_MARKER} What is it?"}]
        text, _ = engine.chat_render(first)
        assert isinstance(text, str)
        prompt = engine.media.prompt(text, [image], False, True)
        [span] = prompt.spans
        prompt.free()
        assert span.n_pos < span.n_tokens  # a grid: max(width, height) positions
        one = engine.submit(GenerationRequest(
            prompt=text, images=(image,), add_special=False, max_tokens=40, sampling=talk,
        )).result()
        second = [*first, {"role": "assistant", "content": one.text},
                  {"role": "user", "content": "And then?"}]
        text, _ = engine.chat_render(second)
        assert isinstance(text, str)
        two = engine.submit(GenerationRequest(
            prompt=text, images=(image,), add_special=False, max_tokens=4, sampling=talk,
        )).result()
        stats = engine.stats()
    assert stats.images_encoded_total == 1
    assert two.usage.cached_tokens > span.start + span.n_tokens
    assert stats.checkpoints_restored_total >= 1

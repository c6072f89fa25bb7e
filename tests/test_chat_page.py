"""The chat page at `/`: what non-browsers get, the security headers, the files it is made of, and
the page itself in headless Chromium (Debian's, driven by Playwright) against live servers with
the embedded model: the API key prompt, picking a model, an answer streaming in, Stop, the
conversation kept across a reload, load/unload over a models folder, phone width, and the plain
error once the server has stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from localllm.errors import ModelLoadError
from localllm.server import create_app
from localllm.server.page.api_router import FILES, OLLAMA_RUNNING
from localllm.settings import Settings
from tests.conftest import API_KEY, FakeEngine, UvicornThread

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "localllm" / "server" / "page" / "static"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
LONG_WAIT_MS = 120_000  # generous: 2 shared cores, one decode thread


@pytest.fixture
def client(fake_engine: FakeEngine) -> Iterator[TestClient]:
    app = create_app(Settings(api_keys=[API_KEY]), fake_engine, model_id="tiny")
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client


# ---------------------------------------------------------------------------- over HTTP


def test_non_browsers_get_ollamas_answer_and_browsers_the_page(client: TestClient) -> None:
    for accept in (None, "*/*", "application/json", "text/plain"):
        headers = {"Accept": accept} if accept else {}
        response = client.get("/", headers=headers)
        assert response.status_code == 200, accept
        assert response.text == OLLAMA_RUNNING
        assert response.headers["content-type"].startswith("text/plain")
    page = client.get("/", headers=HTML)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>localllm chat</title>" in page.text
    head = client.head("/")
    assert head.status_code == 200 and head.content == b""


def test_the_page_needs_no_key_and_the_api_still_does(client: TestClient) -> None:
    assert client.get("/", headers=HTML).status_code == 200  # keys are set, none sent
    for name in FILES:
        assert client.get(f"/page/{name}").status_code == 200, name
    assert client.get("/v1/models").status_code == 401


def test_strict_content_security_policy_on_every_page_answer(client: TestClient) -> None:
    for path, headers in [("/", HTML), ("/", {}), *[(f"/page/{n}", {}) for n in FILES]]:
        response = client.get(path, headers=headers)
        policy = response.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["default-src"] == "'self'"
        assert directives["script-src"] == "'self'"
        assert directives["style-src"] == "'self'"
        assert directives["connect-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'"
        assert "unsafe" not in policy and "http" not in policy  # nothing inline, no other origin
        assert response.headers["x-content-type-options"] == "nosniff"


def test_page_files_are_an_allowlist(client: TestClient) -> None:
    assert client.get("/page/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/page/app.css").headers["content-type"].startswith("text/css")
    for name in ("index.html", "..%2Fapi_router.py", "nope.js", "%2e%2e/__init__.py"):
        response = client.get(f"/page/{name}")
        assert response.status_code == 404, name
        assert response.json()["error"]["code"] == "not_found"


def test_the_loopback_host_check_still_holds_for_the_page(client: TestClient) -> None:
    for path in ("/", "/page/app.js"):
        response = client.get(path, headers={**HTML, "Host": "evil.example"})
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "host_not_allowed"


class _Markup(HTMLParser):
    """Every tag and attribute of the page, to check nothing runs or styles inline."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.tags and self.tags[-1][0] in ("script", "style"):
            self.script_text += data.strip()


def test_the_page_has_no_inline_script_or_style_and_no_other_origin() -> None:
    markup = _Markup()
    markup.feed((STATIC / "index.html").read_text())
    assert markup.script_text == ""
    assert not any(tag == "style" for tag, _ in markup.tags)
    for tag, attrs in markup.tags:
        assert "style" not in attrs, tag
        assert not any(name.startswith("on") for name in attrs), tag
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("/page/", "#")), (tag, value)
    for name in FILES:  # every referenced file is served, every served file is shipped
        assert (STATIC / name).is_file()
    for script in ("app.js", "markdown.js"):
        text = (STATIC / script).read_text()
        for forbidden in ("eval(", "new Function", "http://", "https://cdn", "document.write"):
            assert forbidden not in text, (script, forbidden)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"server/page/static/*"' in pyproject  # shipped in the wheel


# ---------------------------------------------------------------------------- in a browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        reason = "no Chromium found (Debian: apt-get install chromium): the page's tests skip"
        print(reason)
        pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is missing (pip install -e '.[dev]')"
        print(reason)
        pytest.skip(reason)
    with sync_playwright() as p:
        # As root (CI containers) Chromium's sandbox cannot start; nothing here is untrusted.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = p.chromium.launch(executable_path=executable, args=args)
        yield launched
        launched.close()


class PageWatch:
    """A browser page that records CSP violations and uncaught script errors."""

    def __init__(self, browser: Any, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(LONG_WAIT_MS)
        self.problems: list[str] = []
        self.page.on("pageerror", lambda exc: self.problems.append(f"pageerror: {exc}"))
        self.page.on(
            "console",
            lambda msg: (
                self.problems.append(msg.text) if "Content Security Policy" in msg.text else None
            ),
        )

    def close(self) -> None:
        self.context.close()
        assert self.problems == []


@pytest.fixture(scope="module")
def page_server(engine: Any) -> Iterator[UvicornThread]:
    """`serve MODEL`'s app over the session's real engine, with an API key set; stopped by the
    last browser test of this module (the server-down error)."""
    settings = Settings(api_keys=[API_KEY], max_tokens_limit=400)
    app = create_app(
        settings,
        engine,
        model_id="gemma-3-270m",
        plan_summary={
            "quant": "Q4_K_M",
            "tokens_per_conversation": 512,
            "n_gpu_layers": 0,
            "n_layer": 18,
            "decode_tok_s_predicted": 80.0,
            "warnings": [],
        },
        warnings=["test: 3 layers on the CPU, expect slow decoding"],
    )
    server = UvicornThread(app).start()
    yield server
    server.stop()


def _expect() -> Any:
    from playwright.sync_api import expect

    expect.set_options(timeout=LONG_WAIT_MS)
    return expect


def _enter_key(page: Any) -> None:
    expect = _expect()
    expect(page.locator("#error")).to_contain_text("needs an API key")
    expect(page.locator("#api-key")).to_be_focused()  # the settings opened on the key field
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")  # a change event: the models load with the key
    expect(page.locator("#error")).to_be_hidden()


@pytest.mark.model
def test_chat_in_the_browser_stream_stop_reload(
    browser: Any, page_server: UvicornThread, tmp_path: Path
) -> None:
    expect = _expect()
    watch = PageWatch(browser, viewport={"width": 1100, "height": 760})
    page = watch.page
    page.goto(page_server.url + "/")
    _enter_key(page)
    # The picker shows the model and what the fitter knows about it.
    expect(page.locator("#model option")).to_have_count(1)
    assert page.locator("#model").input_value() == "gemma-3-270m"
    info = page.locator("#model-info")
    expect(info).to_contain_text("loaded · Q4_K_M · 512 tokens per conversation")
    expect(info).to_contain_text("0/19 layers on GPU · ~80 tok/s predicted")
    expect(info.locator(".warning")).to_contain_text("expect slow decoding")
    # Deterministic sampling, a short answer first: statistics after it.
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    page.press("#max-tokens", "Tab")
    page.click("#toggle-settings")
    expect(page.locator("#settings")).to_be_hidden()
    page.fill("#prompt", "Name three rivers")
    page.press("#prompt", "Enter")
    first = page.locator(".message.assistant").nth(0)
    expect(first.locator(".message-stats")).to_contain_text("tok/s")
    stats = first.locator(".message-stats").inner_text()
    assert re.search(r"\d+ tokens · [\d.]+ tok/s · context \d+ / 512 tokens", stats), stats
    expect(first.get_by_role("button", name="Regenerate")).to_be_visible()
    # A long answer: text streams in while Stop shows, then Stop ends it mid-answer.
    page.click("#toggle-settings")
    page.fill("#max-tokens", "300")
    page.press("#max-tokens", "Tab")
    page.click("#toggle-settings")
    page.fill("#prompt", "Write a long story about a dragon who learns to bake bread.")
    page.keyboard.press("Enter")
    second = page.locator(".message.assistant").nth(1)
    body = second.locator(".message-body")
    expect(page.locator("#stop")).to_be_visible()
    page.wait_for_function(
        "() => document.querySelectorAll('.message.assistant .message-body')[1]"
        ".textContent.replace('…', '').trim().length > 0"
    )
    early = body.inner_text()
    page.wait_for_function(
        "n => document.querySelectorAll('.message.assistant .message-body')[1]"
        ".textContent.length > n",
        arg=len(early),
    )
    assert page.locator("#stop").is_visible()  # still writing: the text streamed in
    page.click("#stop")
    expect(second.locator(".message-stats")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#prompt")).to_be_focused()
    stopped_text = body.inner_text()
    assert stopped_text.strip()
    # Reload: the conversation is listed, open, with both answers.
    page.reload()
    item = page.locator(".conversation-title")
    expect(item).to_have_count(1)
    expect(item).to_have_text("Name three rivers")
    expect(page.locator(".message")).to_have_count(4)
    expect(page.locator(".message.assistant").nth(1).locator(".message-stats")).to_contain_text(
        "stopped"
    )
    # Regenerate replaces the last answer; then the server stops and the page says so plainly.
    page.locator(".message.assistant").nth(1).get_by_role("button", name="Regenerate").click()
    expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")
    expect(page.locator(".message")).to_have_count(4)
    page_server.stop()
    page.fill("#prompt", "Are you there?")
    page.press("#prompt", "Enter")
    expect(page.locator("#error")).to_contain_text("Cannot reach the localllm server")
    expect(page.locator(".message.assistant").last).to_have_class("message assistant failed")
    watch.close()


def _sse(*events: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def _chunk(**delta: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


def test_reasoning_markdown_errors_and_keys_with_canned_answers(browser: Any) -> None:
    """The page's own logic with the server's answers replayed: reasoning folded apart, Markdown
    escaped with copyable code, and each error said plainly."""
    expect = _expect()
    engine = FakeEngine()
    app = create_app(Settings(), engine, model_id="tiny", plan_summary={"quant": "Q8_0"})
    server = UvicornThread(app).start()
    watch = PageWatch(browser, viewport={"width": 1000, "height": 700})
    page = watch.page
    replies: list[tuple[int, dict[str, str], str]] = []

    sent: list[tuple[dict[str, Any], dict[str, str]]] = []

    def answer(route: Any) -> None:
        sent.append((route.request.post_data_json, route.request.headers))
        status, headers, body = replies.pop(0)
        route.fulfill(status=status, headers=headers, body=body)

    try:
        page.route("**/v1/chat/completions", answer)
        page.goto(server.url + "/")
        expect(page.locator("#model-info")).to_contain_text("Q8_0")
        # The browser enforces the policy: an inline script is refused, and reported.
        violated = page.evaluate(
            """() => new Promise((resolve) => {
                document.addEventListener("securitypolicyviolation",
                    (e) => resolve([e.violatedDirective, window.injected === undefined]));
                const script = document.createElement("script");
                script.textContent = "window.injected = 1";
                document.body.append(script);
            })"""
        )
        assert violated == ["script-src-elem", True]
        assert any("Content Security Policy" in p for p in watch.problems)  # the watch sees it
        watch.problems.clear()
        answer_md = (
            "Here:\n\n```python\nprint('<b>hi</b>')\n```\n\n- **bold** and `code`\n"
            "- <img src=x onerror=alert(1)> [link](javascript:alert(1))"
        )
        replies.append(
            (
                200,
                {"Content-Type": "text/event-stream"},
                _sse(
                    _chunk(role="assistant", content=""),
                    _chunk(reasoning_content="The user wants code."),
                    _chunk(content=answer_md),
                    {
                        "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
                    },
                ),
            )
        )
        page.click("#toggle-settings")  # what the settings send, and the key as Bearer
        page.fill("#system-prompt", "Answer in English.")
        page.fill("#temperature", "0.3")
        page.fill("#max-tokens", "64")
        page.fill("#api-key", "my-key")
        page.fill("#prompt", "code please")
        page.press("#prompt", "Enter")
        expect(page.locator(".message.assistant")).to_have_count(1)
        body_sent, headers_sent = sent[0]
        assert body_sent == {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "Answer in English."},
                {"role": "user", "content": "code please"},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.3,
            "max_tokens": 64,
        }
        assert headers_sent["authorization"] == "Bearer my-key"
        message = page.locator(".message.assistant")
        reasoning = message.locator("details.reasoning")
        expect(reasoning).to_be_visible()
        assert reasoning.get_attribute("open") is None  # folded, apart from the answer
        expect(reasoning.locator("summary")).to_have_text("Reasoning")
        body = message.locator(".message-body")
        expect(body.locator("pre code")).to_have_text("print('<b>hi</b>')")
        expect(body.locator("strong")).to_have_text("bold")
        assert body.locator("img").count() == 0 and body.locator("a").count() == 0
        assert "<img src=x onerror=alert(1)>" in body.inner_text()
        expect(message.locator(".message-stats")).to_contain_text("9 tokens")
        expect(message.locator(".message-stats")).to_contain_text("context 14 / 64 tokens")
        body.locator(".code-block .copy").click()
        expect(body.locator(".code-block .copy")).to_have_text("Copied")
        # Errors, in the words a person needs.
        cases = [
            (503, {"Retry-After": "7"}, "queue_full", "every slot is answering", "again in 7 s"),
            (503, {}, "does_not_fit", "does not fit on this machine", "needs 9 GiB"),
            (401, {}, "invalid_api_key", "needs an API key", "Settings"),
        ]
        for status, headers, code, said, detail in cases:
            envelope = {
                "error": {
                    "message": "needs 9 GiB" if code == "does_not_fit" else "x",
                    "type": "server_error",
                    "param": None,
                    "code": code,
                }
            }
            replies.append(
                (status, {"Content-Type": "application/json", **headers}, json.dumps(envelope))
            )
            message.last.get_by_role("button", name="Regenerate").click()
            expect(page.locator("#error")).to_contain_text(said)
            expect(page.locator("#error")).to_contain_text(detail)
        expect(page.locator("#api-key")).to_be_focused()
        # Shift+Enter adds a line; edit-and-resend replaces what followed.
        page.fill("#prompt", "")
        page.press("#prompt", "a")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("b")
        assert page.locator("#prompt").input_value() == "a\nb"
        replies.append((200, {"Content-Type": "text/event-stream"}, _sse(_chunk(content="ok"))))
        page.locator(".message.user").get_by_role("button", name="Edit").click()
        edit = page.locator(".message.user textarea.edit")
        expect(edit).to_be_focused()
        edit.fill("edited question")
        edit.press("Enter")
        expect(page.locator(".message.user .message-body")).to_have_text("edited question")
        expect(page.locator(".message.assistant .message-body")).to_have_text("ok")
        expect(page.locator(".message")).to_have_count(2)
    finally:
        watch.close()
        server.stop()


def test_a_loading_model_is_said_and_the_page_follows_it_to_loaded(browser: Any) -> None:
    expect = _expect()
    ready = threading.Event()

    def load() -> FakeEngine:
        ready.wait(timeout=300)
        return FakeEngine()

    app = create_app(Settings(), engine_factory=load, model_id="tiny")
    server = UvicornThread(app).start()
    watch = PageWatch(browser)
    page = watch.page
    try:
        page.goto(server.url + "/")
        expect(page.locator("#model option")).to_have_text(["tiny (loading)"])
        page.fill("#prompt", "hello there")
        page.press("#prompt", "Enter")
        expect(page.locator("#error")).to_have_text(
            "The model is still loading. Send again in a moment."
        )
        ready.set()  # the page looks again by itself while a model loads
        expect(page.locator("#model-info .facts")).to_have_attribute("data-status", "loaded")
        page.locator(".message.assistant").get_by_role("button", name="Regenerate").click()
        expect(page.locator(".message.assistant .message-body")).to_have_text("user: hello there")
        expect(page.locator("#error")).to_be_hidden()
    finally:
        ready.set()
        watch.close()
        server.stop()


def test_a_failed_load_is_said(browser: Any) -> None:
    def load() -> FakeEngine:
        raise ModelLoadError("out of memory while loading tiny.gguf")

    server = UvicornThread(create_app(Settings(), engine_factory=load, model_id="tiny")).start()
    watch = PageWatch(browser)
    try:
        watch.page.goto(server.url + "/")
        _expect()(watch.page.locator("#error")).to_have_text(
            "The model failed to load: out of memory while loading tiny.gguf."
        )
    finally:
        watch.close()
        server.stop()


def test_the_keyboard_reaches_every_control_in_reading_order(browser: Any) -> None:
    server = UvicornThread(create_app(Settings(), FakeEngine(), model_id="tiny")).start()
    watch = PageWatch(browser, viewport={"width": 1000, "height": 700})
    page = watch.page
    focused = "() => document.activeElement.id || document.activeElement.textContent.trim()"
    try:
        page.goto(server.url + "/")
        _expect()(page.locator("#prompt")).to_be_focused()  # ready to type at once
        page.focus("a.skip")  # the first control of the page
        order = []
        for _ in range(6):
            page.keyboard.press("Tab")
            order.append(page.evaluate(focused))
        assert order == ["new-chat", "export", "model", "toggle-settings", "prompt", "send"]
        for _ in range(6):
            page.keyboard.press("Shift+Tab")
        assert page.evaluate(focused) == "Skip to the message box"
        page.keyboard.press("Enter")  # the skip link lands in the message box
        _expect()(page.locator("#prompt")).to_be_focused()
        page.keyboard.type("hi")
        page.keyboard.press("Enter")
        _expect()(page.locator(".message.assistant .message-body")).to_have_text("user: hi")
        page.keyboard.press("Shift+Tab")  # back from the box: the answer's own buttons
        assert page.evaluate(focused) == "Regenerate"
    finally:
        watch.close()
        server.stop()


def test_conversations_rename_delete_export_at_phone_width(browser: Any, tmp_path: Path) -> None:
    expect = _expect()
    app = create_app(Settings(), FakeEngine(), model_id="tiny")
    server = UvicornThread(app).start()
    watch = PageWatch(browser, viewport={"width": 390, "height": 800}, accept_downloads=True)
    page = watch.page
    try:
        page.goto(server.url + "/")
        for text in ("first one", "second one"):
            if text == "second one":  # a new chat, from the sidebar drawn over the page
                page.click("#toggle-sidebar")
                page.click("#new-chat")
                expect(page.locator("#sidebar")).to_be_hidden()
            page.fill("#prompt", text)
            page.press("#prompt", "Enter")
            expect(page.locator(".message.assistant .message-stats")).to_contain_text("tokens")
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
        expect(page.locator("#sidebar")).to_be_hidden()
        page.click("#toggle-sidebar")
        expect(page.locator("#new-chat")).to_be_focused()
        titles = page.locator(".conversation-title")
        expect(titles).to_have_text(["second one", "first one"])
        page.get_by_role("button", name="Rename first one").click()
        page.keyboard.press("Control+A")
        page.keyboard.type("Renamed")
        page.keyboard.press("Enter")
        expect(titles).to_have_text(["second one", "Renamed"])
        with page.expect_download() as download:
            page.click("#export")
        exported = json.loads(Path(download.value.path()).read_text())
        assert {c["title"] for c in exported["conversations"]} == {"second one", "Renamed"}
        assert exported["conversations"][0]["messages"][0]["role"] == "user"
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Delete second one").click()
        expect(titles).to_have_text(["Renamed"])
        page.reload()
        page.click("#toggle-sidebar")
        expect(page.locator(".conversation-title")).to_have_text(["Renamed"])
        page.keyboard.press("Escape")  # closes the drawn-over list, focus back on its button
        expect(page.locator("#sidebar")).to_be_hidden()
        expect(page.locator("#toggle-sidebar")).to_be_focused()
    finally:
        watch.close()
        server.stop()


@pytest.mark.model
def test_models_folder_picker_loads_and_unloads(
    browser: Any, tmp_path: Path, embedded_model_path: Path
) -> None:
    from localllm.router import Router

    expect = _expect()
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(embedded_model_path, models / "gemma-a.gguf")
    settings = Settings(
        models_dir=models,
        model="gemma-a",
        n_ctx=512,
        parallel=1,
        threads=1,
        n_batch=256,
        n_ubatch=256,
        max_tokens_limit=16,
    )
    router = Router(settings)
    server = UvicornThread(create_app(settings, router=router, model_id="gemma-a")).start()
    watch = PageWatch(browser, viewport={"width": 1000, "height": 700})
    page = watch.page
    try:
        deadline = time.monotonic() + 300
        while httpx.get(server.url + "/health").status_code != 200:  # the start model loads
            assert time.monotonic() < deadline, "the start model did not load"
            time.sleep(0.2)
        page.goto(server.url + "/")
        info = page.locator("#model-info .facts")
        expect(info).to_contain_text("loaded · Q4_K_M · 512 tokens per conversation")
        expect(page.locator("#load-model")).to_be_hidden()
        page.click("#unload-model")
        expect(info).to_contain_text("unloaded")
        expect(page.locator("#load-model")).to_be_focused()
        expect(page.locator("#model option")).to_have_text(["gemma-a (unloaded)"])
        page.keyboard.press("Enter")  # Load, from the keyboard
        expect(info).to_have_attribute("data-status", "loaded")
        expect(page.locator("#unload-model")).to_be_focused()
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        expect(page.locator(".message.assistant .message-stats")).to_contain_text("tok/s")
        assert page.locator(".message.assistant .message-body").inner_text().strip()
    finally:
        watch.close()
        server.stop()


def test_an_image_attached_to_a_vision_model(browser: Any, tmp_path: Path) -> None:
    """The Image button shows for a model with the `vision` capability; an attached image goes
    as an image_url part, shows in the message, and the answer counts its tokens."""
    from localllm.engine import Engine, EngineConfig
    from tests import tiny_vision as tv
    from tests.tiny_images import png
    from tests.tiny_models import write_gemma3_swa

    write_gemma3_swa(tmp_path / "tiny-gemma3-F16.gguf")
    tv.write_gemma3_mmproj(tmp_path / "mmproj-tiny-gemma3-F16.gguf")
    (tmp_path / "cat.png").write_bytes(png(16, 16))
    config = EngineConfig(
        model_path=tmp_path / "tiny-gemma3-F16.gguf", n_ctx=1024, n_parallel=1, n_threads=1,
        mmproj_path=tmp_path / "mmproj-tiny-gemma3-F16.gguf", max_tokens_default=4,
    )
    bodies: list[dict[str, Any]] = []
    with Engine.load(config) as engine:
        app = create_app(Settings(), engine, model_id="tiny-vision")
        server = UvicornThread(app).start()
        watch = PageWatch(browser)
        page = watch.page
        page.on("request", lambda r: bodies.append(json.loads(r.post_data))
                if r.url.endswith("/v1/chat/completions") else None)
        try:
            expect = _expect()
            page.goto(server.url + "/")
            expect(page.locator("#attach")).to_be_visible()
            page.set_input_files("#attach-file", str(tmp_path / "cat.png"))
            expect(page.locator("#attachments img")).to_have_count(1)
            page.fill("#prompt", "What is it?")
            page.press("#prompt", "Enter")
            expect(page.locator(".message.user .message-images img")).to_have_count(1)
            expect(page.locator(".message.assistant .message-actions button").first).to_be_visible()
            expect(page.locator("#attachments")).to_be_hidden()
            expect(page.locator(".message.assistant.failed")).to_have_count(0)
            expect(page.locator("#error")).to_be_hidden()
        finally:
            watch.close()
            server.stop()
    [body] = bodies
    parts = body["messages"][-1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    assert parts[1] == {"type": "text", "text": "What is it?"}

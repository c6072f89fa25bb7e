"""The models-folder server under hostile load (issue 22): a stopped worker, work for one model
that must not hold up another, keep_alive infinities, deleted and replaced files, bad names and
broken files, an unload mid-stream, a request stuck at shutdown, unsupported completion fields.

No timing asserts: where "the others go on" is the claim, the test checks that the normal
request was answered while the hostile work was still pending, with deadlines far above what a
loaded machine needs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from localllm.engine import GenerationRequest, SamplingParams
from localllm.errors import CancelledError, RequestTimeoutError, SettingsError
from localllm.router import Router, parse_keep_alive
from localllm.settings import Settings
from tests.conftest import UvicornThread
from tests.gguf_factory import write_bert

PATIENCE_S = 120.0  # generous: a deadline for what must happen, never a speed claim


def chat_body(model: str, **more: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 4,
        "temperature": 0,
        **more,
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> Path:
    models = tmp_path_factory.mktemp("hostile-folder")
    shutil.copyfile(embedded_model_path, models / "gemma-a.gguf")
    write_bert(models / "tiny-bert.gguf")
    write_bert(models / "bert-stop.gguf")
    bert = (models / "tiny-bert.gguf").read_bytes()
    (models / "junk.gguf").write_text("hello, not a model\n")
    (models / "cut.gguf").write_bytes(bert[: len(bert) // 2])  # header whole, data cut
    (models / "corrupt.gguf").write_bytes(bert[:8] + b"\xff" * 16 + bert[24:])  # absurd counts
    return models


def folder_settings(folder: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "models_dir": folder,
        "model": "gemma-a",
        "n_ctx": 1024,
        "parallel": 2,
        "threads": 1,
        "n_batch": 256,
        "n_ubatch": 256,
        "keep_alive": "5m",
        "max_tokens_limit": 256,
        "shutdown_grace_s": 0,  # an unload cancels at once (the unload-message test)
        "worker_hang_timeout_s": 60,  # tests that stop a worker lower their worker's bound
    }
    values.update(changes)
    return Settings(**values)


@pytest.fixture(scope="module")
def served(folder: Path) -> Iterator[tuple[UvicornThread, Router]]:
    from localllm.server import create_app

    settings = folder_settings(folder)
    router = Router(settings)
    app = create_app(settings, router=router, model_id=router.start_model_name())
    server = UvicornThread(app).start()
    try:
        with httpx.Client(base_url=server.url, timeout=PATIENCE_S) as health:
            deadline = time.monotonic() + PATIENCE_S
            while health.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "the start model did not load"
                time.sleep(0.1)
        yield server, router
    finally:
        server.stop()


@pytest.fixture
def client(served: tuple[UvicornThread, Router]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0].url, timeout=PATIENCE_S) as c:
        yield c


def cards(client: httpx.Client) -> dict[str, dict[str, Any]]:
    answer = client.get("/v1/models")
    assert answer.status_code == 200, answer.text
    return {card["id"]: card for card in answer.json()["data"]}


def loaded_pid(client: httpx.Client, name: str) -> int:
    assert client.post("/models/load", json={"model": name}).status_code == 200
    pid: int = cards(client)[name]["localllm"]["loaded"]["pid"]
    return pid


def worker_of(router: Router, name: str) -> Any:
    (model,) = [m for m in router.loaded() if m.name == name]
    return model.worker


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie not yet reaped counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def stream_events(client: httpx.Client, path: str, body: dict[str, Any]) -> Iterator[Any]:
    """The parsed `data:` events of a stream, "[DONE]" as the string."""
    with client.stream("POST", path, json={**body, "stream": True}) as stream:
        assert stream.status_code == 200, stream.read()
        for line in stream.iter_lines():
            if line.startswith("data: "):
                yield "[DONE]" if line == "data: [DONE]" else json.loads(line[6:])


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---------------------------------------------------------------------------- durations


@pytest.mark.parametrize("value", ["inf", "+inf", "-inf", "1e400", "9" * 5000, "nan", "2000000h"])
def test_keep_alive_must_be_a_finite_bounded_duration(value: str) -> None:
    with pytest.raises(SettingsError, match="finite duration"):
        parse_keep_alive(value)


def test_keep_alive_numbers_are_bounded_too() -> None:
    for value in (float("inf"), float("nan"), 10**400, 10.0**300):
        with pytest.raises(SettingsError):
            parse_keep_alive(value)
    assert parse_keep_alive("-1") is None and parse_keep_alive("24h") == 86400


def test_settings_refuse_infinite_and_unbounded_numbers(folder: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(request_timeout_s=float("inf"))
    with pytest.raises(ValidationError):
        Settings(shutdown_grace_s=float("nan"))
    with pytest.raises(ValidationError):
        Settings(worker_hang_timeout_s=1e400)
    with pytest.raises(SettingsError, match="finite duration"):
        Router(folder_settings(folder, keep_alive="inf"))  # `serve` exits with a usage error


def test_keep_alive_infinities_are_400_and_listing_stays_200(client: httpx.Client) -> None:
    for value in ("inf", "+inf", "1e400", "9" * 5000, "nan"):
        load = client.post("/models/load", json={"model": "tiny-bert", "keep_alive": value})
        assert error_of(load, 400)["param"] == "keep_alive"
        chat = client.post("/v1/chat/completions", json=chat_body("gemma-a", keep_alive=value))
        assert error_of(chat, 400)["param"] == "keep_alive"
    raw = '{"model": "tiny-bert", "input": "x", "keep_alive": 1e400}'  # JSON's infinity
    embed = client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    assert error_of(embed, 400)["param"].startswith("keep_alive")
    assert cards(client)["gemma-a"]["localllm"]["loaded"]["keep_alive_s"] == 300
    assert client.get("/v1/models/gemma-a").status_code == 200


# ---------------------------------------------------------------------------- names and files


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("gemma\x00-a", "\\x00"),
        ("x" * 5000, "5000 characters"),
        ("a/" + "y" * 300, "characters"),  # a path component too long
        ("junk", "not a GGUF"),
        ("corrupt", "metadata claims"),
        ("cut", "truncated"),
    ],
)
def test_bad_names_and_broken_files_are_4xx_naming_them(
    client: httpx.Client, name: str, shown: str
) -> None:
    requests = [
        client.post("/v1/chat/completions", json=chat_body(name)),
        client.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2}),
        client.post("/v1/embeddings", json={"model": name, "input": "x"}),
        client.post("/models/load", json={"model": name}),
    ]
    if "\x00" not in name and name != "cut":  # a URL cannot carry a NUL; a cut file is listed
        requests.append(client.get(f"/v1/models/{name}"))
    for response in requests:
        assert 400 <= response.status_code < 500, (response.request.url, response.text[:300])
        error = error_of(response, response.status_code)
        assert shown in error["message"], error
    assert "junk" not in cards(client) and "corrupt" not in cards(client)


# ---------------------------------------------------------------------------- deleted, replaced


def test_a_deleted_model_file_is_listed_then_unloaded(
    client: httpx.Client, folder: Path
) -> None:
    write_bert(folder / "bert-del.gguf")
    pid = loaded_pid(client, "bert-del")
    (folder / "bert-del.gguf").unlink()
    listed = cards(client)  # no 404 for everyone: the listing notices and retires the model
    assert "gemma-a" in listed
    assert listed.get("bert-del", {"status": {"value": "unloaded"}})["status"]["value"] in (
        "unloading",
        "unloaded",
    )
    wait_until(lambda: process_gone(pid), "the deleted model's worker exited")
    assert "bert-del" not in cards(client)
    assert client.post("/models/unload", json={"model": "bert-del"}).status_code == 404
    gone = client.post("/v1/embeddings", json={"model": "bert-del", "input": "x"})
    assert error_of(gone, 404)["code"] == "model_not_found"


def test_a_deleted_file_s_model_is_unloaded_with_no_one_asking(
    client: httpx.Client, folder: Path
) -> None:
    """keep_alive -1 and no listing: the periodic file check still retires it."""
    write_bert(folder / "bert-forever.gguf")
    load = client.post("/models/load", json={"model": "bert-forever", "keep_alive": -1})
    assert load.status_code == 200, load.text
    pid = cards(client)["bert-forever"]["localllm"]["loaded"]["pid"]
    (folder / "bert-forever.gguf").unlink()
    wait_until(lambda: process_gone(pid), "the deleted model's worker exited")


def test_a_deleted_file_s_busy_model_can_still_be_unloaded(
    client: httpx.Client, served: tuple[UvicornThread, Router], folder: Path
) -> None:
    write_bert(folder / "bert-busy.gguf")
    pid = loaded_pid(client, "bert-busy")
    os.kill(pid, signal.SIGSTOP)  # a request that cannot end keeps it in flight
    try:
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(
                client.post, "/v1/embeddings", json={"model": "bert-busy", "input": "x"}
            )
            worker = worker_of(served[1], "bert-busy")
            wait_until(lambda: len(worker._waiting) >= 1, "the request reached the worker")
            (folder / "bert-busy.gguf").unlink()
            listed = cards(client)
            assert listed["bert-busy"]["status"] == {"value": "unloading", "file": "missing"}
            assert client.get("/v1/models/bert-busy").json()["status"]["value"] == "unloading"
            unload = client.post("/models/unload", json={"model": "bert-busy"})
            assert unload.status_code == 200, unload.text
            answer = stuck.result(PATIENCE_S)
        assert answer.status_code >= 400  # it ended; with an envelope, not a hang
        error_of(answer, answer.status_code)
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_gone(pid), "the unloaded worker exited")


def test_a_replaced_model_file_is_a_new_model(client: httpx.Client, folder: Path) -> None:
    write_bert(folder / "bert-rep.gguf", n_embd=64)
    first = client.post("/v1/embeddings", json={"model": "bert-rep", "input": "x"})
    assert len(first.json()["data"][0]["embedding"]) == 64
    old_pid = cards(client)["bert-rep"]["localllm"]["loaded"]["pid"]
    replacement = folder / "bert-rep.tmp"
    write_bert(replacement, n_embd=32)
    replacement.replace(folder / "bert-rep.gguf")  # as a download finishing would
    second = client.post("/v1/embeddings", json={"model": "bert-rep", "input": "x"})
    assert second.status_code == 200, second.text
    assert len(second.json()["data"][0]["embedding"]) == 32  # the new file's model answers
    wait_until(lambda: process_gone(old_pid), "the old worker was retired")
    assert cards(client)["bert-rep"]["localllm"]["loaded"]["pid"] != old_pid


# ---------------------------------------------------------------------------- stopped workers


def test_a_stopped_worker_is_killed_its_stream_ends_and_others_are_served(
    client: httpx.Client, served: tuple[UvicornThread, Router]
) -> None:
    router = served[1]
    loaded_pid(client, "tiny-bert")
    pid = loaded_pid(client, "gemma-a")
    worker_of(router, "gemma-a").hang_timeout_s = 10.0  # the worker_hang_timeout_s bound
    body = {"model": "gemma-a", "prompt": "Once upon a time", "max_tokens": 200}
    events: list[Any] = []
    two_events = threading.Event()
    ended_at: list[float] = []

    def consume() -> None:
        with httpx.Client(base_url=served[0].url, timeout=PATIENCE_S) as own:
            for event in stream_events(own, "/v1/completions", body):
                events.append(event)
                if len(events) == 2:
                    two_events.set()
        ended_at.append(time.monotonic())

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    answered_at: list[float] = []
    try:
        assert two_events.wait(PATIENCE_S)
        os.kill(pid, signal.SIGSTOP)
        for _ in range(3):  # the other model and the API answer during the stall
            other = client.post("/v1/embeddings", json={"model": "tiny-bert", "input": "x"})
            assert other.status_code == 200, other.text
            assert client.get("/v1/models").status_code == 200
            answered_at.append(time.monotonic())
        consumer.join(PATIENCE_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "model_crashed" and "stopped answering" in error["message"], error
    assert max(answered_at) < ended_at[0]  # all answered while the stream was stalled
    wait_until(lambda: process_gone(pid), "the stopped worker was killed")
    status = cards(client)["gemma-a"]["status"]
    assert status["value"] == "unloaded" and "stopped answering" in status["error"]
    again = client.post("/v1/chat/completions", json=chat_body("gemma-a"))
    assert again.status_code == 200, again.text  # loaded again on demand


def test_requests_queued_on_a_stopped_worker_hold_up_no_one_else(
    client: httpx.Client, served: tuple[UvicornThread, Router]
) -> None:
    """Eight embedding requests wait on a stopped worker (more than its executor's threads):
    the listing and a chat to another model are answered while all eight still wait."""
    loaded_pid(client, "gemma-a")
    pid = loaded_pid(client, "bert-stop")
    worker = worker_of(served[1], "bert-stop")
    worker.hang_timeout_s = None  # stopped on purpose here: not killed for it
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(8) as pool:
            queued: list[Future[httpx.Response]] = [
                pool.submit(
                    client.post, "/v1/embeddings", json={"model": "bert-stop", "input": f"x {i}"}
                )
                for i in range(8)
            ]
            wait_until(
                lambda: len(worker._waiting) >= 4,
                "the requests reached the stopped worker",
            )
            assert client.get("/v1/models").status_code == 200
            chat = client.post("/v1/chat/completions", json=chat_body("gemma-a"))
            assert chat.status_code == 200, chat.text
            assert not any(f.done() for f in queued)  # answered while all eight still wait
            os.kill(pid, signal.SIGCONT)
            statuses = [f.result(PATIENCE_S).status_code for f in queued]
        assert statuses == [200] * 8  # nothing was lost
    finally:
        os.kill(pid, signal.SIGCONT)


def test_an_embedding_flood_is_refused_by_length_and_others_go_on(client: httpx.Client) -> None:
    """Eight 200 KB inputs for a model that embeds 256 tokens at most are refused from their
    length in characters (no tokenizing); a chat to another model runs beside them."""
    loaded_pid(client, "tiny-bert")
    huge = "word " * 40_000  # 200 KB
    with ThreadPoolExecutor(9) as pool:
        flood = [
            pool.submit(client.post, "/v1/embeddings", json={"model": "tiny-bert", "input": huge})
            for _ in range(8)
        ]
        chat = pool.submit(client.post, "/v1/chat/completions", json=chat_body("gemma-a"))
        listing = client.get("/v1/models")
        answers = [f.result(PATIENCE_S) for f in flood]
        assert chat.result(PATIENCE_S).status_code == 200
    assert listing.status_code == 200
    for answer in answers:
        error = error_of(answer, 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "input"
        assert "200000 characters" in error["message"]
    tokenize = client.post("/tokenize", json={"model": "tiny-bert", "content": "w" * (2 << 20)})
    assert error_of(tokenize, 400)["param"] == "content"


# ---------------------------------------------------------------------------- smaller items


def test_unloading_mid_stream_says_so(client: httpx.Client) -> None:
    loaded_pid(client, "gemma-a")
    body = {"model": "gemma-a", "prompt": "Once upon a time", "max_tokens": 200}
    events: list[Any] = []
    for event in stream_events(client, "/v1/completions", body):
        events.append(event)
        if len(events) == 2:
            assert client.post("/models/unload", json={"model": "gemma-a"}).status_code == 200
    assert events[-1] == "[DONE]"
    message = events[-2]["error"]["message"]
    assert "was unloaded (POST /models/unload)" in message and "shutting down" not in message


def test_completions_refuse_suffix_and_best_of(client: httpx.Client) -> None:
    base = {"model": "gemma-a", "prompt": "Hi", "max_tokens": 2}
    suffix = client.post("/v1/completions", json={**base, "suffix": " end."})
    assert error_of(suffix, 400)["param"] == "suffix"
    best_of = client.post("/v1/completions", json={**base, "best_of": 3})
    assert error_of(best_of, 400)["param"] == "best_of"
    assert client.post("/v1/completions", json={**base, "best_of": 1}).status_code == 200


# ---------------------------------------------------------------------------- the router alone


def run(test: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=PATIENCE_S * 2))


@contextlib.asynccontextmanager
async def router_using(
    folder: Path, name: str, purpose: str = "generate", **settings: Any
) -> AsyncIterator[tuple[Router, Any]]:
    """A router of its own with `name` loaded and in use; a worker the test stopped is
    continued at the end, and everything unloaded."""
    router = Router(folder_settings(folder, load_on_start=False, **settings))
    try:
        async with router.use(name, purpose=purpose) as model:
            try:
                yield router, model
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(model.worker.pid, signal.SIGCONT)
    finally:
        await router.close()


def test_the_router_ends_a_request_past_its_deadline_when_the_worker_cannot(
    folder: Path,
) -> None:
    """request_timeout_s is kept in the parent: a stopped worker (that would never send its
    own timeout) cannot hold a stream past it."""

    async def test() -> None:
        async with router_using(folder, "gemma-a", request_timeout_s=2) as (_, model):
            request = GenerationRequest(
                prompt="Once upon a time",
                sampling=SamplingParams(temperature=0),
                max_tokens=200,
                timeout_s=2,
            )
            handle = await model.worker.asubmit(request)
            os.kill(model.worker.pid, signal.SIGSTOP)
            with pytest.raises(RequestTimeoutError, match="request_timeout_s"):
                async for _ in handle:
                    pass

    run(test)


def test_shutdown_ends_a_submit_stuck_on_a_stopped_worker(folder: Path) -> None:
    """At shutdown past the grace, a request still waiting for a stopped worker to accept it
    ends at once (CancelledError: a 503 envelope), as a running stream ends with [DONE]."""

    async def test() -> None:
        async with router_using(folder, "tiny-bert", purpose="embed") as (router, model):
            os.kill(model.worker.pid, signal.SIGSTOP)
            request = GenerationRequest(prompt="x", sampling=SamplingParams())
            stuck = asyncio.ensure_future(model.worker.asubmit(request))
            await asyncio.sleep(0)
            assert not stuck.done()
            router.cancel_all()
            with pytest.raises(CancelledError, match="shutting down"):
                await stuck

    run(test)


def test_a_worker_silent_while_loading_is_killed(folder: Path) -> None:
    from localllm.router.worker import WorkerClient

    async def test() -> None:
        router = Router(folder_settings(folder, load_on_start=False))
        plan, config = router.registry.planned(router.registry.get("tiny-bert"))
        started = threading.Event()

        def stop_when_born() -> None:  # SIGSTOP the newest worker as soon as it exists
            import multiprocessing

            while not started.is_set():
                for child in multiprocessing.active_children():
                    if child.name.startswith("localllm-worker-silent") and child.pid:
                        os.kill(child.pid, signal.SIGSTOP)
                        started.set()
                        return
                time.sleep(0.001)

        watcher = threading.Thread(target=stop_when_born, daemon=True)
        watcher.start()
        try:
            from localllm.errors import ModelLoadError

            with pytest.raises(ModelLoadError, match="sent nothing"):
                await asyncio.to_thread(WorkerClient.start, "silent", config, None, None, 2.0)
        finally:
            started.set()

    run(test)

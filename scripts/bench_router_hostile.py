"""How long a normal request waits while hostile clients work on the models-folder server
(issue 22). Prints one table row per hostile case: the latency of a normal request to another
model (a one-token chat to the start model) and of GET /v1/models, measured over and over while
the case runs, median and worst, beside the same without any hostile load.

    .venv/bin/python scripts/bench_router_hostile.py [--seconds 8]

The server is `serve` over a temporary folder (the embedded Gemma 3 270M and tiny BERT
embedding models written by tests/gguf_factory.py) in a child process, with short bounds so
the cases end within their window: worker_hang_timeout_s 5, header and body timeouts 5 s.

Cases:
- embedding flood: 8 clients sending 200 KB inputs to a BERT model, again and again;
- stopped worker: a BERT worker SIGSTOPped with 8 embedding requests queued on it (it is killed
  after worker_hang_timeout_s and reloaded on the next request);
- slow clients: 200 idle connections, 50 sending a request head and 20 a body at 1 byte/s;
- bad input: keep_alive "inf"/"1e400"/5000 nines, NUL and 5000-character model names, a non-GGUF;
- file churn: a BERT model loaded, its file deleted, replaced, listed, again and again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localllm.models import EMBEDDED_MODEL_FILE, embedded_model_path  # noqa: E402
from tests.gguf_factory import write_bert  # noqa: E402

START_MODEL = Path(EMBEDDED_MODEL_FILE).stem  # what `serve` without a model loads at start
CHAT = {
    "model": START_MODEL,
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 1,
    "temperature": 0,
}


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = (
        f"models_dir={str(folder)!r}, port={port}, n_ctx=1024, parallel=2, "
        "threads=1, n_batch=256, n_ubatch=256, worker_hang_timeout_s=5, header_timeout_s=5, "
        "body_timeout_s=5, request_timeout_s=60, log_level='error'"
    )
    code = (
        "from localllm.server.run import serve\nfrom localllm.settings import Settings\n"
        f"serve(Settings({settings}))\n"
    )
    config = folder / "none.toml"
    config.write_text("")
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "LOCALLLM_CONFIG": str(config)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def probe(url: str, stop: threading.Event) -> dict[str, list[float]]:
    """Normal requests, one after another, until `stop`: their latencies in seconds."""
    times: dict[str, list[float]] = {"chat": [], "models": []}
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            started = time.perf_counter()
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            times["chat"].append(time.perf_counter() - started)
            started = time.perf_counter()
            assert client.get("/v1/models").status_code == 200
            times["models"].append(time.perf_counter() - started)
    return times


def repeat(action: Callable[[], object], stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(httpx.HTTPError, OSError):
            action()


def embedding_flood(url: str, stop: threading.Event) -> None:
    huge = "word " * 40_000
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(8) as pool:
        body = {"model": "tiny-bert", "input": huge}
        for _ in range(8):
            pool.submit(repeat, lambda: client.post("/v1/embeddings", json=body), stop)


def stopped_worker(url: str, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/models/load", json={"model": "bert-stop"})
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        os.kill(cards["bert-stop"]["localllm"]["loaded"]["pid"], signal.SIGSTOP)
        with ThreadPoolExecutor(8) as pool:
            body = {"model": "bert-stop", "input": "x"}
            for _ in range(8):
                pool.submit(client.post, "/v1/embeddings", json=body)
            stop.wait()


def slow_clients(url: str, stop: threading.Event) -> None:
    port = int(url.rsplit(":", 1)[1])
    sockets: list[socket.socket] = []
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 1000 + b"\r\n\r\n"
    body_head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    for i in range(270):
        with contextlib.suppress(OSError):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if 200 <= i < 220:
                sock.sendall(body_head)
            sockets.append(sock)
    slow = sockets[200:]
    sent = 0
    while not stop.wait(1.0):
        for index, sock in enumerate(slow):
            data = head if index >= 20 else b"x" * 1000
            with contextlib.suppress(OSError):
                sock.sendall(data[sent : sent + 1])
        sent += 1
    for sock in sockets:
        sock.close()


def bad_input(url: str, stop: threading.Event) -> None:
    bodies = [
        {**CHAT, "model": "tiny-bert", "keep_alive": "inf"},
        {**CHAT, "keep_alive": "1e400"},
        {**CHAT, "keep_alive": "9" * 5000},
        {**CHAT, "model": "gemma\x00a"},
        {**CHAT, "model": "x" * 5000},
        {**CHAT, "model": "junk"},
    ]
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            for body in bodies:
                with contextlib.suppress(httpx.HTTPError):
                    client.post("/v1/chat/completions", json=body)
                    client.post("/models/load", json={"model": body["model"], "keep_alive": "inf"})


def file_churn(folder: Path) -> Callable[[str, threading.Event], None]:
    def churn(url: str, stop: threading.Event) -> None:
        path = folder / "bert-churn.gguf"
        with httpx.Client(base_url=url, timeout=120) as client:
            n_embd = 32
            while not stop.is_set():
                write_bert(folder / "bert-churn.tmp", n_embd=n_embd)
                (folder / "bert-churn.tmp").replace(path)
                client.post("/v1/embeddings", json={"model": "bert-churn", "input": "x"})
                client.get("/v1/models")
                path.unlink()
                client.get("/v1/models")
                n_embd = 96 - n_embd

    return churn


def measure(
    url: str, seconds: float, hostile: Callable[[str, threading.Event], None] | None
) -> dict[str, list[float]]:
    stop = threading.Event()
    attacker = None
    if hostile is not None:
        attacker = threading.Thread(target=hostile, args=(url, stop), daemon=True)
        attacker.start()
        time.sleep(0.5)  # let it start
    result: dict[str, list[float]] = {}
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    result = probe(url, stop)
    if attacker is not None:
        attacker.join(120)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="window per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copyfile(embedded_model_path(ROOT / "models"), folder / EMBEDDED_MODEL_FILE)
        write_bert(folder / "tiny-bert.gguf")
        write_bert(folder / "bert-stop.gguf")
        (folder / "junk.gguf").write_text("not a model")
        cases: list[tuple[str, Callable[[str, threading.Event], None] | None]] = [
            ("none (baseline)", None),
            ("embedding flood", embedding_flood),
            ("stopped worker", stopped_worker),
            ("slow clients", slow_clients),
            ("bad input", bad_input),
            ("file churn", file_churn(folder)),
        ]
        with serve_folder(folder) as url:
            httpx.post(url + "/models/load", json={"model": "tiny-bert"}, timeout=120)
            print(f"{'hostile case':<18} {'chat median':>12} {'chat worst':>11} "
                  f"{'models median':>14} {'models worst':>13} {'n':>4}")
            for name, hostile in cases:
                times = measure(url, args.seconds, hostile)
                chat, models = times["chat"], times["models"]
                print(
                    f"{name:<18} {statistics.median(chat):>11.3f}s {max(chat):>10.3f}s "
                    f"{statistics.median(models):>13.3f}s {max(models):>12.3f}s {len(chat):>4}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

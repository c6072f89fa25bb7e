"""serve() as a process: health while loading, a graceful SIGTERM that lets a stream finish."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_sigterm_drains_in_flight_requests_and_exits_0(
    embedded_model_path: Path, tmp_path: Path
) -> None:
    port = _free_port()
    code = (
        "from localllm.server.run import serve\n"
        "from localllm.settings import Settings\n"
        f"serve(Settings(port={port}, models_dir={str(embedded_model_path.parent)!r}, "
        "n_ctx=512, parallel=2, threads=1, n_batch=256, n_ubatch=256, shutdown_grace_s=20))\n"
    )
    env = {**os.environ, "LOCALLLM_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.1)

        events: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 40, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        events.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert process.wait(60) == 0
        # The in-flight stream ran to its end: a finish reason and [DONE].
        assert events[-1] == "data: [DONE]"
        finishes = [
            json.loads(e[6:])["choices"][0].get("finish_reason")
            for e in events[:-1]
            if json.loads(e[6:]).get("choices")
        ]
        assert "length" in finishes
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

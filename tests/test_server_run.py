"""serve() as a process: health while loading, a graceful SIGTERM that lets a stream finish."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import served_process

pytestmark = pytest.mark.model


def test_sigterm_drains_in_flight_requests_and_exits_0(
    embedded_model_path: Path, tmp_path: Path
) -> None:
    settings = "n_ctx=512, parallel=2, threads=1, n_batch=256, n_ubatch=256, shutdown_grace_s=20"
    with served_process(settings, embedded_model_path, tmp_path) as (process, url):
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

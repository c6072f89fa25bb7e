"""Connection timeouts on a real uvicorn server (a fake engine behind it): an idle connection, a
client sending its request head one byte at a time, and one sending its body so, are closed;
a client that sends its request in time is answered and its connection kept alive."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from localllm.server import create_app
from localllm.server.connections import uvicorn_options
from localllm.settings import Settings
from tests.conftest import FakeEngine

LIMIT_S = 1.0  # every connection timeout of the server under test
PATIENCE_S = 30.0  # how long a test waits for what must happen (a loaded machine is slow)


@dataclass
class Server:
    port: int
    server: Any
    thread: threading.Thread


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    import uvicorn

    settings = Settings(header_timeout_s=LIMIT_S, body_timeout_s=LIMIT_S, idle_timeout_s=LIMIT_S)
    app = create_app(settings, FakeEngine())
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_options(settings)
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + PATIENCE_S
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Server(uv.servers[0].sockets[0].getsockname()[1], uv, thread)
    finally:
        uv.should_exit = True
        thread.join(30)


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE_S)
    return sock


def closed_while_trickling(sock: socket.socket, data: bytes) -> tuple[bool, bytes]:
    """Send `data` a byte at a time until the server closes the connection (True) or all of
    it is sent (False); also returns whatever the server answered."""
    sock.settimeout(0.2)
    answer = b""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return True, answer
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, answer
        if not chunk:
            return True, answer
        answer += chunk
    return False, answer


def test_an_idle_connection_is_closed(server: Server) -> None:
    with connect(server) as sock:
        assert sock.recv(1) == b""  # closed by the server, within PATIENCE_S (or recv raises)


def test_a_slow_request_head_is_closed(server: Server) -> None:
    # Slow enough that the whole head would take longer than PATIENCE_S.
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 400 + b"\r\n\r\n"
    with connect(server) as sock:
        closed, answer = closed_while_trickling(sock, head)
    assert closed and answer == b""


def test_a_slow_body_gets_408_and_is_closed(server: Server) -> None:
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * 400 + b'"}]}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head)
        closed, answer = closed_while_trickling(sock, body)
        try:  # the rest of the answer, up to the close
            sock.settimeout(PATIENCE_S)
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    assert closed or answer  # stopped early
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout_s" in answer and b"connection: close" in answer.lower()


def test_a_prompt_client_is_answered_and_kept_alive(server: Server) -> None:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=PATIENCE_S)
    try:
        sockets = []
        for _ in range(2):  # the same connection twice: keep-alive still works
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and b'"ok"' in response.read()
            sockets.append(connection.sock)
        assert sockets[0] is sockets[1] and sockets[0] is not None
    finally:
        connection.close()

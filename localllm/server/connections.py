"""Connection timeouts: how long a client may take to send a request, and to sit idle.

uvicorn closes a keep-alive connection `timeout_keep_alive` seconds after its last answer, but
nothing else: a connection that never sends a byte, or sends its request head or body one byte a
second, stays open for as long as the client likes (h11 has no header timeout), and enough of
them exhaust the file descriptors. The anchors bound each phase: nginx's client_header_timeout
and client_body_timeout (60 s each), Go's http.Server ReadHeaderTimeout and IdleTimeout. Here:

- idle: a connection sending nothing is closed after `idle_timeout_s` (5 s, uvicorn's default
  keep-alive), counted from its opening or from its previous answer;
- header: the whole request head must arrive within `header_timeout_s` (30 s) of the same
  moment; past it the connection is closed without an answer, as nginx does (h11 has no
  request to answer yet);
- body: the whole body must arrive within `body_timeout_s` (60 s) of the head, else 408 with
  `Connection: close` (the rest of the body is not read).

The first two are a subclass of uvicorn's own HTTP protocol (`guarded_protocol`, for h11 and
httptools alike: both set `cycle` when a head is complete and call `on_response_complete`
after each answer); the third is ASGI middleware (`BodyDeadlineMiddleware`). `uvicorn_options`
gives `serve` (and tests) the uvicorn.Config arguments for the settings.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localllm.errors import APIError
from localllm.settings import Settings


def guarded_protocol(base: type[Any], idle_timeout_s: float, header_timeout_s: float) -> type:
    """uvicorn's HTTP protocol class `base` with idle and request-head deadlines."""

    class GuardedProtocol(base):  # type: ignore[misc]
        _guard_timer: asyncio.TimerHandle | None = None
        _guard_cycle: Any = None
        _guard_idle: bool = True
        _guard_start: float = 0.0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            timer = self._guard_timer
            if timer is None:
                return
            if self.cycle is not self._guard_cycle:  # a new request's head is in
                timer.cancel()
                self._guard_timer = None
            elif self._guard_idle:  # the first bytes: from now on the head's deadline
                self._guard_idle = False
                timer.cancel()
                delay = self._guard_start + header_timeout_s - self.loop.time()
                self._guard_timer = self.loop.call_later(max(0.0, delay), self._expire)

        def on_response_complete(self) -> None:
            self._arm()  # before uvicorn starts on a pipelined request (that cancels nothing)
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
            self._guard_cycle = self.cycle
            self._guard_idle = True
            self._guard_start = self.loop.time()
            delay = min(idle_timeout_s, header_timeout_s)
            self._guard_timer = self.loop.call_later(delay, self._expire)

        def _expire(self) -> None:
            self._guard_timer = None
            if self.cycle is self._guard_cycle and not self.transport.is_closing():
                self.transport.close()  # no complete head in time: nothing to answer

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config arguments enforcing the settings' idle and header timeouts."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return {
        "http": guarded_protocol(
            AutoHTTPProtocol, settings.idle_timeout_s, settings.header_timeout_s
        ),
        # uvicorn's own keep-alive timer, a second behind ours (it takes whole seconds).
        "timeout_keep_alive": math.ceil(settings.idle_timeout_s) + 1,
    }


class BodyTimeoutError(APIError):
    """The request body did not arrive within body_timeout_s."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            f"the request body did not arrive within {timeout_s:g} s (body_timeout_s)",
            code="request_timeout",
            headers={"Connection": "close"},
        )


class BodyDeadlineMiddleware:
    """The whole request body within `timeout_s` of the head, else 408 and the connection is
    closed. Reads after the body (a handler waiting for the client to disconnect) are not
    bounded."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BodyTimeoutError(self.timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)

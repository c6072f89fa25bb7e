"""A running request as seen by its caller: events out, cancel in.

The scheduler thread pushes events; the caller reads them either with `async for` (the event
loop is woken with `call_soon_threadsafe`, so it never blocks on llama.cpp) or with a plain
`for` loop (a condition variable, for scripts).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from localllm.engine.types import Completion, Event, FinishEvent, TextEvent, TokenLogprob


class _Failure:
    """Carries an exception through the event queue; raised to the reader."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class RequestHandle:
    """Iterate it for `TextEvent`s then one `FinishEvent`; errors are raised while iterating."""

    def __init__(self, request_id: str, prompt_tokens: int, on_cancel: Callable[[], None]) -> None:
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._events: deque[Event | _Failure] = deque()
        self._done = False  # the last item (finish or failure) has been pushed
        self._cancelled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        try:
            self._bind(asyncio.get_running_loop())
        except RuntimeError:
            pass  # no loop: a script; async iteration binds later

    # Scheduler side.
    def _push(self, item: Event | _Failure) -> None:
        with self._cond:
            if self._done:
                return
            self._events.append(item)
            if isinstance(item, FinishEvent | _Failure):
                self._done = True
            self._cond.notify_all()
            loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:
                pass  # the loop closed: nobody is listening any more

    def _fail(self, error: BaseException) -> None:
        self._push(_Failure(error))

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def finished(self) -> bool:
        return self._done

    # Caller side.
    def cancel(self) -> None:
        """Stop generating (client gone). The slot is freed within one decode step."""
        with self._cond:
            if self._cancelled or self._done:
                self._cancelled = True
                return
            self._cancelled = True
        self._on_cancel()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._cond:
            self._loop = loop
            self._wakeup = asyncio.Event()

    def _take(self) -> Event | _Failure | None:
        with self._cond:
            return self._events.popleft() if self._events else None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        if self._loop is None:
            self._bind(asyncio.get_running_loop())
        assert self._wakeup is not None
        while True:
            # Clear before looking: a push after the look schedules a set() that wakes us.
            self._wakeup.clear()
            item = self._take()
            if item is None:
                await self._wakeup.wait()
                continue
            if isinstance(item, _Failure):
                raise item.error
            yield item
            if isinstance(item, FinishEvent):
                return

    def __iter__(self) -> Iterator[Event]:
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                item = self._events.popleft()
            if isinstance(item, _Failure):
                raise item.error
            yield item
            if isinstance(item, FinishEvent):
                return

    def result(self) -> Completion:
        """Block until done; the whole text and usage."""
        return _collect(iter(self))

    async def aresult(self) -> Completion:
        return _collect(iter([event async for event in self]))


def _collect(events: Iterator[Event]) -> Completion:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    for event in events:
        if isinstance(event, TextEvent):
            parts.append(event.text)
            logprobs.extend(event.logprobs)
        else:
            return _completion(parts, logprobs, event)
    raise RuntimeError("request ended without a finish event")


def _completion(parts: list[str], logprobs: list[TokenLogprob], finish: FinishEvent) -> Completion:
    return Completion(
        text="".join(parts),
        finish_reason=finish.finish_reason,
        usage=finish.usage,
        logprobs=tuple(logprobs),
        time_to_first_token_s=finish.time_to_first_token_s,
        decode_tokens_per_s=finish.decode_tokens_per_s,
    )

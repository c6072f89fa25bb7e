"""sd_notify and the watchdog against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from localllm import service


class FakeSystemd:
    """A bound datagram socket collecting what the service sends, with arrival times."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recv(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def assert_nothing_pending(self) -> None:
        self.sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            self.sock.recv(4096)

    # Background collection, for cadence tests.
    def start_collecting(self) -> None:
        self.sock.settimeout(0.02)

        def run() -> None:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(4096)
                except TimeoutError:
                    continue
                self.received.append((time.monotonic(), data.decode()))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop_collecting(self) -> list[tuple[float, str]]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=2)
        return self.received


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def fake_systemd(clean_env: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    # A short directory: AF_UNIX paths are limited to 107 bytes and pytest's tmp_path can be long.
    folder = tempfile.mkdtemp(prefix="llsd")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    clean_env.setenv("NOTIFY_SOCKET", path)
    try:
        yield FakeSystemd(sock)
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def test_no_notify_socket_is_a_quiet_no_op(clean_env: pytest.MonkeyPatch) -> None:
    assert service.notify("READY=1") is False
    assert service.notify_ready() is False
    assert service.notify_stopping() is False
    assert service.notify_status("x") is False
    assert service.watchdog_interval_s() is None


def test_exact_datagrams(fake_systemd: FakeSystemd) -> None:
    assert service.notify_status("loading gemma-3-270m") is True
    assert fake_systemd.recv() == "STATUS=loading gemma-3-270m"
    assert service.notify_ready() is True
    assert fake_systemd.recv() == "READY=1"
    assert service.notify_ready("serving gemma") is True
    assert fake_systemd.recv() == "READY=1\nSTATUS=serving gemma"
    assert service.notify_extend_timeout(2.5) is True
    assert fake_systemd.recv() == "EXTEND_TIMEOUT_USEC=2500000"
    assert service.notify_watchdog() is True
    assert fake_systemd.recv() == "WATCHDOG=1"
    assert service.notify_stopping() is True
    assert fake_systemd.recv() == "STOPPING=1"
    fake_systemd.assert_nothing_pending()


def test_status_cannot_inject_assignments(fake_systemd: FakeSystemd) -> None:
    service.notify_status("line one\nREADY=1")
    assert fake_systemd.recv() == "STATUS=line one READY=1"


def test_abstract_socket(clean_env: pytest.MonkeyPatch) -> None:
    name = f"localllm-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert service.notify_ready() is True
        sock.settimeout(2)
        assert sock.recv(4096) == b"READY=1"


def test_unreachable_socket_returns_false(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert service.notify_ready() is False
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert service.notify_ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("200000", "self", 0.2),
        ("200000", "other", None),
        ("200000", "junk", None),
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    clean_env: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        clean_env.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        clean_env.setenv("WATCHDOG_PID", pid)
    assert service.watchdog_interval_s() == expected


def test_watchdog_loop_without_watchdog_returns(clean_env: pytest.MonkeyPatch) -> None:
    asyncio.run(asyncio.wait_for(service.watchdog_loop(), timeout=1))


WATCHDOG_S = 0.2  # pings every 0.1 s


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_watchdog_cadence(fake_systemd: FakeSystemd, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1_000_000)))
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    fake_systemd.start_collecting()

    # The cadence is what the loop asks for (half the interval), checked as asked: how late a
    # loaded machine wakes it is the scheduler's business, not the loop's.
    periods: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        periods.append(delay)
        await real_sleep(delay)

    async def main() -> None:
        task = asyncio.create_task(service.watchdog_loop())
        deadline = time.monotonic() + 120
        while len(fake_systemd.received) < 10:
            assert time.monotonic() < deadline, fake_systemd.received
            await real_sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service.asyncio, "sleep", sleep)
        asyncio.run(main())
    received = fake_systemd.stop_collecting()
    assert {data for _, data in received} == {"WATCHDOG=1"}
    assert set(periods) == {WATCHDOG_S / 2}, periods  # one sleep of half the interval per ping


def test_blocked_event_loop_stops_the_pings(
    fake_systemd: FakeSystemd, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1_000_000)))
    fake_systemd.start_collecting()
    blocked: dict[str, float] = {}

    async def main() -> None:
        task = asyncio.create_task(service.watchdog_loop())
        await asyncio.sleep(0.35)
        blocked["start"] = time.monotonic()
        time.sleep(0.6)  # a wedged loop: nothing else runs, so no pings
        blocked["end"] = time.monotonic()
        await asyncio.sleep(0.35)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    times = [t for t, _ in fake_systemd.stop_collecting()]
    during = [t for t in times if blocked["start"] + 0.01 < t < blocked["end"]]
    assert during == [], "pings arrived while the event loop was blocked"
    # The gap systemd would see exceeds WatchdogSec, so it would restart the service ...
    assert max(_gaps(times)) > WATCHDOG_S
    # ... and pings resume once the loop runs again.
    assert any(t > blocked["end"] for t in times)
    assert any(t < blocked["start"] for t in times)


def test_unhealthy_engine_skips_pings(
    fake_systemd: FakeSystemd, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1_000_000)))
    fake_systemd.start_collecting()
    state = {"healthy": True}

    async def main() -> None:
        task = asyncio.create_task(service.watchdog_loop(healthy=lambda: state["healthy"]))
        await asyncio.sleep(0.25)
        state["healthy"] = False
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    received = fake_systemd.stop_collecting()
    assert 2 <= len(received) <= 4, received

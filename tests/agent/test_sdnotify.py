"""sd_notify messages read back from a real AF_UNIX datagram socket, as systemd would read them."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdnotify


class NotifySocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def messages(self) -> list[str]:
        received = []
        self.sock.setblocking(False)
        while True:
            try:
                received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return received


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield NotifySocket(sock)
    sock.close()


def test_ready_status_watchdog_stopping(notify_socket: NotifySocket) -> None:
    assert sdnotify.ready("serving smollm2 2026.11 (fp32, onnxruntime)")
    assert sdnotify.status("1 queued,\n1 running")
    assert sdnotify.watchdog()
    assert sdnotify.extend_timeout(90)
    assert sdnotify.stopping("finishing job q-1")
    assert notify_socket.messages() == [
        "READY=1\nSTATUS=serving smollm2 2026.11 (fp32, onnxruntime)",
        "STATUS=1 queued, 1 running",  # one line: systemctl shows a single status line
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=90000000",
        "STOPPING=1\nSTATUS=finishing job q-1",
    ]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert NotifySocket(sock).messages() == ["READY=1"]
    finally:
        sock.close()


def test_no_ops_outside_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.status("x") is False  # a dead socket is not an error for the agent
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert sdnotify.status("x") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "90000000")
    assert sdnotify.watchdog_interval_s() == 90.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 90.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for our parent
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "bogus")
    assert sdnotify.watchdog_interval_s() is None


def test_watchdog_pings_only_while_the_worker_beats(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    dog = sdnotify.Watchdog(clock=lambda: now[0])
    assert dog.enabled and dog.interval_s == 10.0 and dog.stall_s == 10.0
    assert dog.tick()  # first tick pings at once
    now[0] += 1
    assert not dog.tick()  # not due yet (every interval / 2)
    now[0] += 4
    dog.beat()
    assert dog.tick()
    now[0] += 11  # the worker has not beaten for 11 s > stall_s
    assert not dog.tick()
    assert not dog.tick()
    dog.beat()  # it recovered
    assert dog.tick()
    assert notify_socket.messages() == ["WATCHDOG=1"] * 3


def test_watchdog_disabled_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    dog = sdnotify.Watchdog()
    assert not dog.enabled
    dog.beat()
    assert dog.tick() is False

"""The real agent process under a real NOTIFY_SOCKET: READY=1 once the bundle is loaded and the
broker connected, STATUS= lines, WATCHDOG=1 while the worker is alive, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.conftest import Broker, MqttProbe, start_agent, wait_status


def test_agent_notifies_systemd(
    default_bundle: Path, broker: Broker, probe: MqttProbe, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1.0)
    agent = start_agent(
        default_bundle,
        broker,
        tmp_path / "agent",
        env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"},  # ping every ~1 s
    )
    messages: list[str] = []
    try:
        wait_status(probe, agent.device, "online")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 2:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
        agent.process.terminate()
        assert agent.process.wait(60) == 0
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        agent.stop()
        sock.close()
    ready = [m for m in messages if "READY=1" in m]
    assert len(ready) == 1 and "serving" in ready[0]
    assert any(m.startswith("STATUS=") for m in messages)
    assert sum("WATCHDOG=1" in m for m in messages) >= 2
    first_ready = messages.index(ready[0])
    assert all("WATCHDOG=1" not in m for m in messages[:first_ready])  # no pings before READY
    assert any("STOPPING=1" in m for m in messages[first_ready:])

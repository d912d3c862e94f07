"""A private Mosquitto on a free loopback port, for `make demo`, `edge-agent bench --mqtt` and the
tests: the real broker the devices use, with its own throw-away config, never the system's."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass
class LocalBroker:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    config_path: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        stop_process(self.process, grace_s=10)


def stop_process(process: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM, up to `grace_s` seconds to exit, then SIGKILL; the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_local_broker(directory: Path, port: int | None = None) -> LocalBroker:
    """Anonymous, loopback only, no persistence; config and log in `directory`."""
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 10000\nlog_dest stderr\n"
    )
    return launch_mosquitto(config, port)


def launch_mosquitto(
    config: Path, port: int, what: str = "mosquitto", *, append_log: bool = False
) -> LocalBroker:
    """Run Mosquitto with `config` (logging to mosquitto.log beside it, appended to across
    restarts with `append_log`) until it listens."""
    if not Path(MOSQUITTO).exists():
        raise AgentError(
            "no_broker", "mosquitto is not installed: `sudo apt-get install mosquitto`"
        )
    log_path = config.parent / "mosquitto.log"
    with log_path.open("ab" if append_log else "wb") as log:
        process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return LocalBroker("127.0.0.1", port, process, config)
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.05)
    process.kill()
    process.wait(10)
    raise AgentError("no_broker", f"{what} did not start:\n{log_path.read_text()}")

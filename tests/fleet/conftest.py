"""Fleet-tool fixtures: a small synthetic bundle, signing keys, and scripted test devices.

`ScriptedDevice` is NOT an agent. It stands in for one only so the fleet tool's update and
rollout logic (following ota/status, waves, halting) can be tested against a real broker without
loading a model: it subscribes to `P/D/ota` and answers each command with a fixed sequence of
retained `P/D/ota/status` messages. The end-to-end rollout against real agents is tested with
the agent's OTA code.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import MqttConfig
from agent.mqtt_link import Incoming, MqttLink, Subscription
from agent.topics import Topics
from fleet.signing import generate_keypair
from tests.conftest import Broker, make_synthetic_bundle


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_synthetic_bundle(tmp_path / "bundle")


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """(private, public) of a fresh fleet key pair."""
    return generate_keypair(tmp_path / "keys", "fleet")


# --- scripted devices (test stand-ins for agents, see the module docstring) --------------------

Step = tuple[str, float | None, dict[str, str] | None]  # state, progress, error

SCRIPTS: dict[str, list[Step]] = {
    "ok": [("downloading", 0.0, None), ("downloading", 0.5, None), ("downloading", 1.0, None),
           ("verifying", None, None), ("testing", None, None), ("active", 1.0, None)],
    "fail": [("downloading", 0.0, None), ("verifying", None, None),
             ("failed", None, {"code": "untrusted", "message": "not signed by a trusted key"})],
    "rollback": [("downloading", 1.0, None), ("testing", None, None),
                 ("rolled_back", None, {"code": "probation", "message": "crashed 3 times"})],
    "silent": [],
}  # fmt: skip


class ScriptedDevice:
    """Answers every update command on `P/D/ota` with the statuses of `script`, retained."""

    def __init__(self, broker: Broker, device: str, script: str, step_s: float = 0.05) -> None:
        self.device = device
        self.script = SCRIPTS[script]
        self.step_s = step_s
        self.commands: list[dict[str, Any]] = []
        self.topics = Topics("edgellm", device)
        self.link = MqttLink(
            MqttConfig(host=broker.host, port=broker.port, session_expiry_s=0),
            client_id=f"scripted-{device}-{uuid.uuid4().hex[:6]}",
            subscriptions=[Subscription(self.topics.ota)],
            on_message=self._on_command,
        )
        self.link.start()
        assert self.link.wait_connected(10), "scripted device could not reach the test broker"
        time.sleep(0.2)  # let the SUBACK land before a command is sent

    def publish_status(self, status: dict[str, Any]) -> None:
        self.link.publish(self.topics.ota_status, status, qos=1, retain=True)

    def _on_command(self, message: Incoming) -> None:
        command = json.loads(message.payload)
        self.commands.append(command)
        threading.Thread(target=self._play, args=(command,), daemon=True).start()

    def _play(self, command: dict[str, Any]) -> None:
        for state, progress, error in self.script:
            time.sleep(self.step_s)
            self.publish_status(
                {"id": command["id"], "state": state, "version": command["version"],
                 "progress": progress, "error": error}
            )  # fmt: skip

    def close(self) -> None:
        self.link.stop()


DeviceFactory = Callable[..., ScriptedDevice]


@pytest.fixture
def scripted_device(broker: Broker) -> Iterator[DeviceFactory]:
    started: list[ScriptedDevice] = []

    def start(script: str, device: str | None = None, step_s: float = 0.05) -> ScriptedDevice:
        scripted = ScriptedDevice(broker, device or f"dev-{uuid.uuid4().hex[:8]}", script, step_s)
        started.append(scripted)
        return scripted

    yield start
    for scripted in started:
        scripted.close()


@pytest.fixture
def mqtt(broker: Broker) -> MqttConfig:
    return MqttConfig(host=broker.host, port=broker.port, session_expiry_s=0)

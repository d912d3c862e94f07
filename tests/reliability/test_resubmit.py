"""fleet/resubmit.py's rules against scripted devices on a real broker (fast, no model).

`ScriptedDevice` is NOT an agent: it answers every job it receives with a fixed reply, so the
submitter's decisions (retry on queue_full, route around a device, give up) can be checked
quickly. The real thing, with agents that die, is test_failover.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttConfig
from fleet.resubmit import FleetSubmitter, ResubmitPolicy
from tests.conftest import Broker


class ScriptedDevice:
    def __init__(self, broker: Broker, prefix: str, name: str, reply: str) -> None:
        self.name, self.reply, self.prefix = name, reply, prefix
        self.received: list[str] = []
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"scripted-{name}", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(
            [(f"$share/{prefix}/{prefix}/fleet/jobs", 1), (f"{prefix}/{name}/jobs", 1)]
        )
        self._publish("status", {"state": "online"}, retain=True)

    def _publish(self, tail: str, payload: dict[str, Any], retain: bool = False) -> None:
        self.client.publish(f"{self.prefix}/{self.name}/{tail}", json.dumps(payload), 1, retain)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        job_id = json.loads(msg.payload)["id"]
        self.received.append(job_id)
        results = f"results/{job_id}"
        if self.reply == "queue_full":
            error = {"code": "queue_full", "message": "full"}
            self._publish(results, {"id": job_id, "event": "error", "error": error})
        elif self.reply == "done":
            self._publish(results, {"id": job_id, "event": "accepted", "queue_position": 0})
            self._publish(results, {"id": job_id, "event": "done", "device": self.name})
        # "silent": takes it and never answers (a device that just died)

    def close(self) -> None:
        self._publish("status", {"state": "offline"}, retain=True)
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def scripted(broker: Broker) -> Iterator[Any]:
    prefix = f"rs{uuid.uuid4().hex[:6]}"  # a topic space of its own on the shared broker
    devices: list[ScriptedDevice] = []

    def make(name: str, reply: str) -> ScriptedDevice:
        devices.append(ScriptedDevice(broker, prefix, name, reply))
        return devices[-1]

    make.prefix = prefix  # type: ignore[attr-defined]
    yield make
    for device in devices:
        device.close()


def submitter(broker: Broker, prefix: str, **policy: Any) -> FleetSubmitter:
    config = MqttConfig(host=broker.host, port=broker.port, prefix=prefix, session_expiry_s=0)
    return FleetSubmitter(config, ResubmitPolicy(**policy))


def test_queue_full_sends_the_job_to_another_device(broker: Broker, scripted: Any) -> None:
    busy = scripted("busy", "queue_full")
    ok = scripted("ok", "done")
    with submitter(broker, scripted.prefix, retry_delay_s=0.1) as fleet:
        ids = [fleet.submit({"id": f"q-{n}", "prompt": "x"}) for n in range(4)]
        finals = fleet.wait(ids, 10)
    assert all(f["event"] == "done" and f["device"] == "ok" for f in finals.values())
    assert busy.received and ok.received  # the broker gave the busy one its share first


def test_a_job_taken_by_a_silent_device_goes_elsewhere(broker: Broker, scripted: Any) -> None:
    scripted("dead", "silent")
    ok = scripted("ok", "done")
    with submitter(broker, scripted.prefix, accept_timeout_s=0.5) as fleet:
        ids = [fleet.submit({"id": f"s-{n}", "prompt": "x"}) for n in range(4)]
        finals = fleet.wait(ids, 10)
        reasons = [r.reason for r in fleet.resubmissions]
    assert all(f["device"] == "ok" for f in finals.values())
    assert reasons and all("no device accepted it" in r for r in reasons)
    # Sent again to the live device's own topic, never to the fleet topic (and the dead one).
    assert sorted(set(ok.received)) == sorted(ids)


def test_with_no_device_at_all_it_gives_up_with_a_clear_error(
    broker: Broker, scripted: Any
) -> None:
    with submitter(broker, scripted.prefix, accept_timeout_s=0.2, max_attempts=2) as fleet:
        job_id = fleet.submit({"id": "lonely", "prompt": "x"})
        final = fleet.wait([job_id], 10)[job_id]
    assert final["event"] == "error" and final["error"]["code"] == "no_device"
    assert "after 2 sends" in final["error"]["message"]

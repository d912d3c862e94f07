"""Fault-injection helpers: a Mosquitto of the test's own (so it can be stopped, restarted on the
same port, frozen), and a result collector that counts every event per job id and survives the
broker's restarts (persistent session, re-subscribes on every connect)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.local_broker import free_port, stop_process
from tests.conftest import AgentProcess, Broker, launch_mosquitto

FINAL = ("done", "error")


@dataclass
class OwnBroker:
    """A Mosquitto for one test: stop it, start it again on the same port, freeze it."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def broker(self) -> Broker:
        assert self.process is not None
        return Broker("127.0.0.1", self.port, self.process, self.directory / "mosquitto.conf")

    def start(self) -> Broker:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "mosquitto.conf"
        # Persistence as a production broker has it (deploy/mosquitto/): sessions and their
        # queued QoS 1 messages survive a restart. `user root`: stay root, so that it can write
        # its database into pytest's 0700 temporary directory.
        config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.directory}/\n"
            "max_queued_messages 10000\nlog_dest stderr\nuser root\n"
        )
        launched = launch_mosquitto(config, self.port, "mosquitto", append_log=True)
        self.process = launched.process
        return self.broker

    def stop(self) -> None:
        """A clean stop (SIGTERM): Mosquitto writes its persistence database and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def log(self) -> str:
        return (self.directory / "mosquitto.log").read_text(errors="replace")


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    broker = OwnBroker(tmp_path / "mosquitto")
    broker.start()
    yield broker
    if broker.process is not None and broker.process.poll() is None:
        broker.thaw()  # a frozen process does not act on SIGTERM
        broker.stop()


class Collector:
    """Publishes jobs and records every event on `edgellm/+/results/+` and `edgellm/+/status`.

    A persistent session (clean_start False, session expiry 10 min): across a broker restart with
    persistence, or a short outage, nothing addressed to it is lost."""

    def __init__(self, broker: Broker, *, persistent: bool = True) -> None:
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.arrivals: dict[str, list[tuple[float, str, dict[str, Any]]]] = defaultdict(list)
        self.status: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.RLock()  # predicates passed to wait() take it again
        self._changed = threading.Condition(self._lock)
        self.connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.reconnect_delay_set(1, 2)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.connected.set()  # SUBACK: now it hears
        self.client.on_disconnect = lambda *args: self.connected.clear()
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 600 if persistent else 0
        self.client.connect(
            broker.host, broker.port, keepalive=60, clean_start=not persistent,
            properties=properties,
        )  # fmt: skip
        self.client.loop_start()
        assert self.connected.wait(10), "the collector could not connect"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([("edgellm/+/results/+", 1), ("edgellm/+/status", 1)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            event = json.loads(msg.payload)
        except ValueError:
            event = {"unparsable": msg.payload.decode(errors="replace")}
        now = time.monotonic()
        with self._changed:
            if msg.topic.endswith("/status"):
                self.status.append((now, msg.topic, event))
            else:
                job_id = msg.topic.rsplit("/", 1)[1]
                self.events[job_id].append(event)
                self.arrivals[job_id].append((now, msg.topic, event))
            self._changed.notify_all()

    def publish(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=1).wait_for_publish(10)

    def finals(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events.get(job_id, []) if e.get("event") in FINAL]

    def count(self, job_id: str, event: str) -> int:
        with self._lock:
            return sum(1 for e in self.events.get(job_id, []) if e.get("event") == event)

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._changed.wait(min(remaining, 0.5))

    def wait_final(self, ids: list[str], timeout: float) -> None:
        def all_final() -> bool:
            return all(any(e.get("event") in FINAL for e in self.events.get(i, [])) for i in ids)

        try:
            self.wait(all_final, timeout, f"a final event for each of {len(ids)} jobs")
        except AssertionError:
            missing = [i for i in ids if not self.finals(i)]
            raise AssertionError(
                f"no final event for {len(missing)} jobs: {missing[:10]}"
            ) from None

    def wait_status(self, device: str, state: str, timeout: float, after: float = 0.0) -> float:
        """When `device` published `state` (after the monotonic time `after`)."""
        topic = f"edgellm/{device}/status"
        found: list[float] = []

        def seen() -> bool:
            found[:] = [t for t, tp, s in self.status if tp == topic and s.get("state") == state]
            found[:] = [t for t in found if t >= after]
            return bool(found)

        self.wait(seen, timeout, f"{device} {state}")
        return found[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collector_for() -> Iterator[Any]:
    made: list[Collector] = []

    def make(broker: Broker, *, persistent: bool = True) -> Collector:
        collector = Collector(broker, persistent=persistent)
        made.append(collector)
        return collector

    yield make
    for collector in made:
        collector.close()


STORY = [{"role": "user", "content": "Tell me a long story about the sea."}]


def job(job_id: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    """A chat job that runs to `max_tokens` (a raw prompt may stop at once with EOS)."""
    return {"id": job_id, "messages": STORY, "max_tokens": max_tokens, **extra}


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set size of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def stop_agent(agent: AgentProcess) -> None:
    stop_process(agent.process, grace_s=60)


# Fast reconnects for every fault test: the broker comes back within seconds.
FAST_RECONNECT = "[mqtt]\nreconnect_min_s = 1.0\nreconnect_max_s = 2.0\n"

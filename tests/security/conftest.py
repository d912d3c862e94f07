"""A Mosquitto started from the shipped fleet configuration (deploy/mosquitto/), certificates made
by `fleet.certs` in a temporary directory, and a TLS test client that records what the broker
answers (CONNACK, SUBACK and PUBACK reason codes, delivered messages)."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.local_broker import free_port
from fleet.certs import make_ca, make_client, make_server
from tests.conftest import REPO, Broker, launch_mosquitto, publish_properties

DEPLOY = REPO / "deploy" / "mosquitto"


@dataclass(frozen=True)
class Identity:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A fleet CA with two devices and an operator, plus a rogue CA's certificate."""

    ca_dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    device_a: Identity
    device_b: Identity
    operator: Identity
    rogue: Identity  # same CN as device_a, but signed by another CA


def _identity(ca_dir: Path, out: Path, name: str, *, kind: str = "device") -> Identity:
    files = make_client(ca_dir, out, name, kind="device" if kind == "device" else "operator")
    return Identity(name, files.cert, files.key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    make_ca(root / "ca")
    server = make_server(root / "ca", root / "broker", hosts=["localhost"], ips=["127.0.0.1"])
    suffix = uuid.uuid4().hex[:6]
    make_ca(root / "rogue-ca", name="not the fleet CA")
    a = _identity(root / "ca", root / "clients", f"orin-a-{suffix}")
    return Pki(
        ca_dir=root / "ca",
        ca=root / "ca" / "ca.pem",
        server_cert=server.cert,
        server_key=server.key,
        device_a=a,
        device_b=_identity(root / "ca", root / "clients", f"orin-b-{suffix}"),
        operator=_identity(root / "ca", root / "clients", "operator", kind="operator"),
        rogue=_identity(root / "rogue-ca", root / "rogue", a.name),
    )


def render_config(pki: Pki, directory: Path, port: int) -> Path:
    """Install the shipped mosquitto.conf as a drop-in the way README.md says, under a main
    config like Debian's (persistence, logging, `include_dir`). Only the port (loopback) and the
    file paths are changed; every other line (TLS, identity, ACL) is as shipped."""
    text = (DEPLOY / "mosquitto.conf").read_text()
    replacements = {
        "listener 8883": f"listener {port} 127.0.0.1",
        "cafile /etc/mosquitto/edgellm/ca.pem": f"cafile {pki.ca}",
        "certfile /etc/mosquitto/edgellm/server.pem": f"certfile {pki.server_cert}",
        "keyfile /etc/mosquitto/edgellm/server.key": f"keyfile {pki.server_key}",
        "acl_file /etc/mosquitto/edgellm/acl": f"acl_file {DEPLOY / 'acl'}",
    }
    lines = text.splitlines()
    for old, new in replacements.items():
        assert old in lines, f"deploy/mosquitto/mosquitto.conf no longer has the line {old!r}"
        lines[lines.index(old)] = new
    conf_d = directory / "conf.d"
    conf_d.mkdir(exist_ok=True)
    (conf_d / "edgellm.conf").write_text("\n".join(lines) + "\n")
    # Debian's /etc/mosquitto/mosquitto.conf, in substance. `user root`: tests run as root, and
    # Mosquitto would otherwise drop to the `mosquitto` user, who cannot read pytest's 0700
    # temporary directories (it warns about running as root, harmlessly).
    main = directory / "mosquitto.conf"
    main.write_text(
        f"persistence true\npersistence_location {directory}/\n"
        f"log_dest stderr\nlog_type all\nuser root\ninclude_dir {conf_d}\n"
    )
    return main


def start_tls_mosquitto(pki: Pki, directory: Path) -> Broker:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = render_config(pki, directory, port)
    return launch_mosquitto(config, port, "mosquitto (fleet TLS config)")


@pytest.fixture(scope="module")
def tls_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = start_tls_mosquitto(pki, tmp_path_factory.mktemp("mosquitto-tls"))
    yield broker
    broker.stop()


def broker_log(broker: Broker) -> str:
    return (broker.config_path.parent / "mosquitto.log").read_text(errors="replace")


@dataclass
class Delivered:
    topic: str
    payload: bytes
    correlation_data: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class TlsClient:
    """A paho MQTT v5 client over TLS that keeps every reason code the broker sends back."""

    broker: Broker
    ca: Path | None
    cert: Path | None = None
    key: Path | None = None
    client: paho.Client = field(init=False)
    connacks: queue.Queue[str] = field(default_factory=queue.Queue)
    disconnects: queue.Queue[str] = field(default_factory=queue.Queue)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    pubacks: dict[int, int] = field(default_factory=dict)
    inbox: queue.Queue[Delivered] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sec-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        if self.ca is not None:
            self.client.tls_set(
                ca_certs=str(self.ca),
                certfile=str(self.cert) if self.cert else None,
                keyfile=str(self.key) if self.key else None,
            )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    # paho callbacks (its network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connacks.put(str(rc))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnects.put(str(rc))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self.subacks[mid] = [rc.value for rc in rcs]

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self.pubacks[mid] = rc.value

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        self.inbox.put(Delivered(msg.topic, bytes(msg.payload), corr))

    def connect(self, timeout: float = 5.0) -> str | None:
        """Connect; return the CONNACK reason ("Success", ...) or None if the broker never sent
        one (the TLS handshake was refused, or the connection was dropped)."""
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as exc:  # ssl.SSLError is an OSError
            return f"refused in the TLS handshake: {exc}"
        self.client.loop_start()
        try:
            return self.connacks.get(timeout=timeout)
        except queue.Empty:
            return None

    def subscribe(self, topic: str) -> list[int]:
        """Subscribe at QoS 1; return the SUBACK reason codes."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == paho.MQTT_ERR_SUCCESS and mid is not None
        codes: list[int] = self._wait(self.subacks, mid)
        return codes

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        retain: bool = False,
    ) -> int:
        """Publish at QoS 1; return the PUBACK reason code (0 success, 0x87 not authorized)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = publish_properties(response_topic, correlation_data)
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        code: int = self._wait(self.pubacks, info.mid)
        return code

    def _wait(self, table: dict[int, Any], mid: int, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while mid not in table:
            if time.monotonic() > deadline:
                raise AssertionError(f"no acknowledgement for message id {mid} in {timeout} s")
            time.sleep(0.01)
        return table.pop(mid)

    def received(self, wait_s: float) -> list[Delivered]:
        """Everything delivered within `wait_s` seconds (used to assert that nothing came)."""
        deadline = time.monotonic() + wait_s
        got: list[Delivered] = []
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                got.append(self.inbox.get(timeout=remaining))
            except queue.Empty:
                break
        return got

    def next(self, timeout: float, topic: str | None = None) -> Delivered:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self.inbox.get(timeout=remaining)
            except queue.Empty:
                break
            if topic is None or message.topic == topic:
                return message
        raise AssertionError(f"nothing on {topic or 'any topic'} within {timeout} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


NOT_AUTHORIZED = 0x87
# PUBACK success, or success with "no matching subscribers" (0x10): both mean accepted.
ACCEPTED = (0x00, 0x10)
GRANTED_QOS_1 = 0x01


@pytest.fixture
def connect(tls_broker: Broker) -> Iterator[Any]:
    """Connect a TLS client as an identity (or with no certificate); closed after the test."""
    clients: list[TlsClient] = []

    def make(
        identity: Identity | None, *, ca: Path | None, expect: str | None = "Success"
    ) -> TlsClient:
        client = TlsClient(
            tls_broker,
            ca,
            identity.cert if identity else None,
            identity.key if identity else None,
        )
        clients.append(client)
        result = client.connect(timeout=2.0 if expect is None else 5.0)
        if expect is not None:
            assert result == expect, f"connect as {identity and identity.name}: {result}"
        return client

    yield make
    for client in clients:
        client.close()

"""No device speaks for another, against a real Mosquitto with the shipped configuration
(deploy/mosquitto/: mosquitto.conf, operators.conf, acl, and the dynamic security plugin's file
written by `edge-fleet certs roles`):

- a device connecting with another device's client id does not take over that device's session
  (the client id is the certificate's CN), and a device's session still survives its restart;
- a listed device cannot subscribe to the fleet's jobs except through the shared subscription;
- operators' tools share one certificate on the operators' listener without kicking each other;
- `edge-fleet certs` refuses every identity the ACL treats specially."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import time
import uuid
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
from fleet.certs import (
    ACL_USERS,
    TOPIC_WORDS,
    make_ca,
    make_client,
)
from fleet.cli import main
from tests.conftest import Broker, launch_mosquitto
from tests.security.conftest import (
    ACCEPTED,
    DEPLOY,
    GRANTED_QOS_1,
    NOT_AUTHORIZED,
    Identity,
    Pki,
    TlsClient,
    broker_log,
    render_config,
)

SHARED = "$share/edgellm/edgellm/fleet/jobs"
FLEET_JOBS = "edgellm/fleet/jobs"


@dataclass(frozen=True)
class FleetBroker:
    """The shipped config with both listeners: devices on `broker.port`, operators on
    `operators_port` (trusting only `operators_ca`)."""

    broker: Broker
    operators_port: int
    operators_ca: Path
    operator: Identity  # CN `operator`, signed by the operators' CA
    unlisted: Identity  # a fleet-CA device that dynamic-security.json does not list

    @property
    def operators(self) -> Broker:
        return Broker(
            self.broker.host, self.operators_port, self.broker.process, self.broker.config_path
        )


def render_fleet_config(
    pki: Pki, directory: Path, port: int, operators_port: int, operators_ca: Path, roles: Path
) -> Path:
    """conftest's rendering of mosquitto.conf (only the port and paths changed), plus the
    plugin's file and operators.conf installed beside it the way deploy/mosquitto/README.md says."""
    directory.mkdir(parents=True, exist_ok=True)
    main_config = render_config(pki, directory, port)
    edgellm = directory / "conf.d" / "edgellm.conf"
    lines = edgellm.read_text().splitlines()
    plugin_file = "plugin_opt_config_file /etc/mosquitto/edgellm/dynamic-security.json"
    assert plugin_file in lines, "mosquitto.conf no longer loads the dynamic security plugin"
    lines[lines.index(plugin_file)] = f"plugin_opt_config_file {roles}"
    edgellm.write_text("\n".join(lines) + "\n")
    replacements = {
        "listener 8884": f"listener {operators_port} 127.0.0.1",
        "cafile /etc/mosquitto/edgellm/operators-ca.pem": f"cafile {operators_ca}",
        "certfile /etc/mosquitto/edgellm/server.pem": f"certfile {pki.server_cert}",
        "keyfile /etc/mosquitto/edgellm/server.key": f"keyfile {pki.server_key}",
    }
    lines = (DEPLOY / "operators.conf").read_text().splitlines()
    for old, new in replacements.items():
        assert old in lines, f"deploy/mosquitto/operators.conf no longer has the line {old!r}"
        lines[lines.index(old)] = new
    (directory / "conf.d" / "operators.conf").write_text("\n".join(lines) + "\n")
    return main_config


@pytest.fixture(scope="module")
def fleet(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetBroker]:
    root = tmp_path_factory.mktemp("fleet-broker")
    make_ca(root / "operators-ca", name="edge-llm operators CA")
    files = make_client(root / "operators-ca", root / "operators", "operator", kind="operator")
    operator = Identity("operator", files.cert, files.key)
    name = f"orin-c-{uuid.uuid4().hex[:6]}"
    files = make_client(pki.ca_dir, root / "unlisted", name, kind="device")
    unlisted = Identity(name, files.cert, files.key)
    # What a site runs: `edge-fleet certs roles --device A --device B --out ...`.
    roles = root / "dynamic-security.json"
    assert main(["certs", "roles", "--device", pki.device_a.name, "--device",
                 pki.device_b.name, "--out", str(roles)]) == 0  # fmt: skip
    port, operators_port = free_port(), free_port()
    config = render_fleet_config(
        pki, root / "broker", port, operators_port, root / "operators-ca" / "ca.pem", roles
    )
    broker = launch_mosquitto(config, port, "mosquitto (fleet config, both listeners)")
    yield FleetBroker(broker, operators_port, root / "operators-ca" / "ca.pem", operator, unlisted)
    broker.stop()


@dataclass
class SessionClient(TlsClient):
    """A TLS client that sends a chosen client id, optionally with a persistent session
    (clean_start=False, session expiry), like the agent's."""

    client_id: str = ""
    persistent: bool = False
    will_topic: str | None = None
    session_present: queue.Queue[bool] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id or f"sec-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.tls_set(ca_certs=str(self.ca), certfile=str(self.cert), keyfile=str(self.key))
        self.client.on_connect = self._on_session_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        if self.will_topic is not None:
            self.client.will_set(self.will_topic, '{"state": "offline"}', qos=1, retain=True)

    def _on_session_connect(
        self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        self.session_present.put(bool(flags.session_present))
        self.connacks.put(str(rc))

    def connect(self, timeout: float = 5.0) -> str | None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if self.persistent else 0
        self.client.connect(
            self.broker.host, self.broker.port, keepalive=30,
            clean_start=not self.persistent, properties=props,
        )  # fmt: skip
        self.client.loop_start()
        try:
            return self.connacks.get(timeout=timeout)
        except queue.Empty:
            return None


@pytest.fixture
def clients() -> Iterator[list[TlsClient]]:
    made: list[TlsClient] = []
    yield made
    for client in made:
        client.close()


def connected(made: list[TlsClient], client: TlsClient) -> TlsClient:
    made.append(client)
    result = client.connect()
    assert result == "Success", result
    return client


def device(fleet: FleetBroker, pki: Pki, who: Identity, made: list[TlsClient]) -> TlsClient:
    return connected(made, TlsClient(fleet.broker, pki.ca, who.cert, who.key))


def operator(fleet: FleetBroker, pki: Pki, made: list[TlsClient]) -> TlsClient:
    """The operator on its own listener, with its operators'-CA certificate."""
    op = fleet.operator
    return connected(made, TlsClient(fleet.operators, pki.ca, op.cert, op.key))


# --- item 8: the client id is the certificate's CN ------------------------------------------------


def test_a_device_using_another_devices_client_id_does_not_take_over_its_session(
    pki: Pki, fleet: FleetBroker, clients: list[TlsClient]
) -> None:
    a_name = pki.device_a.name
    status, jobs = f"edgellm/{a_name}/status", f"edgellm/{a_name}/jobs"
    op = operator(fleet, pki, clients)
    op.subscribe(status)
    # A holds a persistent session under the agent's client id, with its Last Will.
    a = SessionClient(
        fleet.broker, pki.ca, pki.device_a.cert, pki.device_a.key,
        client_id=f"edge-agent-{a_name}", persistent=True, will_topic=status,
    )  # fmt: skip
    connected(clients, a)
    assert a.subscribe(jobs) == [GRANTED_QOS_1]
    assert a.publish(status, {"state": "online"}, retain=True) in ACCEPTED
    assert op.next(5, status).json() == {"state": "online"}
    # B, with its own valid certificate, sends A's client id (and a clean start, which would
    # discard A's session and its queued jobs).
    b = SessionClient(
        fleet.broker, pki.ca, pki.device_b.cert, pki.device_b.key, client_id=f"edge-agent-{a_name}"
    )
    connected(clients, b)
    for n in range(5):
        assert op.publish(jobs, {"id": f"for-a-{n}", "prompt": "x"}) in ACCEPTED
    got = sorted(m.json()["id"] for m in a.received(2.0) if m.topic == jobs)
    assert got == [f"for-a-{n}" for n in range(5)], got
    assert a.disconnects.empty(), "device B's connection disconnected device A"
    assert op.received(0.5) == [], "A's Last Will (offline) was published"
    assert b.disconnects.empty()
    # The broker knows B by B's CN, not by the id B sent.
    log = broker_log(fleet.broker)
    assert f"as {pki.device_b.name} " in log
    assert "already connected, closing old connection" not in log


def test_a_devices_session_is_keyed_by_its_cn_and_survives_a_reconnect(
    pki: Pki, fleet: FleetBroker, clients: list[TlsClient]
) -> None:
    """The agent's persistent session (clean_start=False, expiry) still works when the broker
    replaces its client id: QoS 1 jobs sent while it is away are delivered when it is back, even
    if it comes back sending another client id."""
    b_name = pki.device_b.name
    jobs = f"edgellm/{b_name}/jobs"
    first = SessionClient(
        fleet.broker, pki.ca, pki.device_b.cert, pki.device_b.key,
        client_id=f"edge-agent-{b_name}", persistent=True,
    )  # fmt: skip
    connected(clients, first)
    assert first.subscribe(jobs) == [GRANTED_QOS_1]
    first.close()
    op = operator(fleet, pki, clients)
    for n in range(5):
        assert op.publish(jobs, {"id": f"queued-{n}", "prompt": "x"}) in ACCEPTED
    back = SessionClient(
        fleet.broker, pki.ca, pki.device_b.cert, pki.device_b.key,
        client_id=f"restarted-{uuid.uuid4().hex[:6]}", persistent=True,
    )  # fmt: skip
    connected(clients, back)
    assert back.session_present.get(timeout=5) is True
    got = sorted(m.json()["id"] for m in back.received(2.0) if m.topic == jobs)
    assert got == [f"queued-{n}" for n in range(5)], got


# --- operators: one certificate, several tools at once --------------------------------------------


def test_operator_tools_share_one_certificate_on_the_operators_listener(
    pki: Pki, fleet: FleetBroker, clients: list[TlsClient]
) -> None:
    """Three connections with the same operator certificate (as from three `edge-fleet` processes,
    each with its own `edge-fleet-<random>` id) stay connected and each receives what it asked."""
    a_name = pki.device_a.name
    ops = [operator(fleet, pki, clients) for _ in range(3)]
    for n, op in enumerate(ops):
        assert op.subscribe(f"edgellm/{a_name}/results/op-{n}") == [GRANTED_QOS_1]
    a = device(fleet, pki, pki.device_a, clients)
    for n in range(3):
        assert a.publish(f"edgellm/{a_name}/results/op-{n}", {"id": f"op-{n}"}) in ACCEPTED
    for n, op in enumerate(ops):
        assert op.next(5).json() == {"id": f"op-{n}"}
        assert op.disconnects.empty(), f"operator connection {n} was disconnected"


def test_the_operators_listener_refuses_device_certificates(
    pki: Pki, fleet: FleetBroker, clients: list[TlsClient]
) -> None:
    """Only the operators' CA is trusted there: a device cannot connect where it could choose its
    client id."""
    a = TlsClient(fleet.operators, pki.ca, pki.device_a.cert, pki.device_a.key)
    clients.append(a)
    assert a.connect(timeout=2.0) != "Success"
    assert a.connacks.empty()


# --- item 9: fleet jobs only through the shared subscription --------------------------------------


PLAIN_FILTERS = (
    FLEET_JOBS,
    "edgellm/fleet/#",
    "edgellm/fleet/+",
    "edgellm/+/jobs",
    "edgellm/#",
    "+/fleet/jobs",
    "#",
    "$share/spy/edgellm/fleet/jobs",  # a share group of its own receives every message too
    "$share/edgellm/edgellm/+/jobs",
)


def test_a_listed_device_cannot_subscribe_to_fleet_jobs_except_shared(
    pki: Pki, fleet: FleetBroker, clients: list[TlsClient]
) -> None:
    spy = device(fleet, pki, pki.device_b, clients)
    for topic in PLAIN_FILTERS:
        assert spy.subscribe(topic) == [NOT_AUTHORIZED], topic
    a = device(fleet, pki, pki.device_a, clients)
    own = f"edgellm/{pki.device_a.name}"
    for topic in (SHARED, f"{own}/jobs", f"{own}/jobs/cancel", f"{own}/ota"):
        assert a.subscribe(topic) == [GRANTED_QOS_1], topic
    op = operator(fleet, pki, clients)
    for n in range(4):
        assert op.publish(FLEET_JOBS, {"id": f"fleet-{n}", "prompt": "secret"}) in ACCEPTED
    assert op.publish(f"{own}/jobs", {"id": "own", "prompt": "x"}) in ACCEPTED
    got = sorted(m.json()["id"] for m in a.received(2.0))
    assert got == [f"fleet-{n}" for n in range(4)] + ["own"]
    assert spy.received(0.5) == []


def test_limit_a_device_missing_from_dynamic_security_json_can_read_every_fleet_job(
    pki: Pki, fleet: FleetBroker, clients: list[TlsClient]
) -> None:
    """THE DOCUMENTED LIMIT (README "Security", deploy/mosquitto/README.md): the plugin knows only
    the devices `edge-fleet certs roles` listed; for any other certificate it defers to the ACL
    file, which cannot tell a plain from a shared subscription. Such a device still reads every
    fleet job (never another device's own jobs): list every device."""
    unlisted = device(fleet, pki, fleet.unlisted, clients)
    assert unlisted.subscribe(FLEET_JOBS) == [GRANTED_QOS_1]
    assert unlisted.subscribe(f"edgellm/{pki.device_a.name}/jobs") == [GRANTED_QOS_1]
    op = operator(fleet, pki, clients)
    assert op.publish(FLEET_JOBS, {"id": "seen-by-unlisted", "prompt": "x"}) in ACCEPTED
    assert op.publish(f"edgellm/{pki.device_a.name}/jobs", {"id": "a-only"}) in ACCEPTED
    assert [m.json()["id"] for m in unlisted.received(1.5)] == ["seen-by-unlisted"]


# --- issue 19 item 2: identities the ACL treats specially -----------------------------------------


def acl_users() -> set[str]:
    text = (DEPLOY / "acl").read_text()
    return {m.group(1) for m in re.finditer(r"^user\s+(\S+)\s*$", text, re.MULTILINE)}


def certs(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main(["certs", *map(str, args)])
    return code, capsys.readouterr().err


def test_the_reserved_list_is_the_shipped_acls_user_lines() -> None:
    users = acl_users()
    assert users, "deploy/mosquitto/acl names no `user`: the parse above is stale"
    assert users == set(ACL_USERS)


@pytest.mark.parametrize(
    "name",
    [
        *sorted(acl_users() | {u.upper() for u in acl_users()} | TOPIC_WORDS),
        "edge-fleet-1a2b3c4d",
        "edge-fleet",
    ],
)
def test_reserved_identities_are_refused_for_devices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    certs(capsys, "ca", "--out", tmp_path / "ca")
    code, err = certs(capsys, "device", "--ca", tmp_path / "ca", "--id", name, "--out", tmp_path)
    assert code == 1, err
    assert "[bad_name]" in err and repr(name) in err
    assert list(tmp_path.glob("*.pem")) == [] and list(tmp_path.glob("*.key")) == []
    code, err = certs(capsys, "roles", "--device", name, "--out", tmp_path / "roles.json")
    assert code == 1 and "[bad_name]" in err
    assert not (tmp_path / "roles.json").exists()


def test_acl_users_are_issued_only_as_client_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs(capsys, "ca", "--out", tmp_path / "ca")
    for user in sorted(acl_users()):
        code, err = certs(
            capsys, "client", "--ca", tmp_path / "ca", "--id", user, "--out", tmp_path / user
        )
        assert code == 0, err
    for word in sorted(TOPIC_WORDS):
        code, err = certs(
            capsys, "client", "--ca", tmp_path / "ca", "--id", word, "--out", tmp_path
        )
        assert code == 1 and "[bad_name]" in err, word


def test_roles_file_lists_each_device_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "fleet.txt"
    listing.write_text("orin-01  # the first\n\norin-02\n")
    code, err = certs(capsys, "roles", "--devices-file", listing, "--device", "orin-03",
                      "--out", tmp_path / "roles.json")  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "roles.json").read_text())
    assert [c["username"] for c in config["clients"]] == ["orin-03", "orin-01", "orin-02"]
    code, err = certs(capsys, "roles", "--device", "orin-01", "--device", "orin-01",
                      "--out", tmp_path / "again.json")  # fmt: skip
    assert code == 1 and "listed twice" in err


# --- the real agent behind the shipped config -----------------------------------------------------


def ask_prompt(fleet: FleetBroker, pki: Pki, device_id: str) -> subprocess.Popen[str]:
    """`edge-fleet prompt` with the operators' certificate, on the operators' listener."""
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", "prompt", "Hi", "--device", device_id,
         "--max-tokens", "4", "--broker", f"localhost:{fleet.operators_port}",
         "--ca", str(pki.ca), "--cert", str(fleet.operator.cert),
         "--key", str(fleet.operator.key), "--json", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip


def wait_for(log_path: Path, text: str, count: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while log_path.read_text(errors="replace").count(text) < count:
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in the agent's log"
        time.sleep(0.2)


@pytest.mark.session_bundle
def test_the_agent_keeps_its_queued_jobs_across_a_restart_and_two_operator_tools_at_once(
    default_bundle: Path, pki: Pki, fleet: FleetBroker, clients: list[TlsClient], tmp_path: Path
) -> None:
    """The real agent as device A (it sends `edge-agent-<id>`, the broker uses its CN): jobs sent
    while it is stopped are all answered after it restarts (its persistent session, now keyed by
    the CN); then two `edge-fleet prompt` processes with the one operator certificate, at once,
    are both answered."""
    from tests.security.test_agent_tls import launch

    a_name = pki.device_a.name
    broker = f"localhost:{fleet.broker.port}"
    process, log_path = launch(default_bundle, broker, pki, tmp_path)
    try:
        wait_for(log_path, "connected to", 1, process)
        assert stop_process(process, grace_s=30) == 0, log_path.read_text()[-3000:]
        op = operator(fleet, pki, clients)
        op.subscribe(f"edgellm/{a_name}/results/#")
        for n in range(3):
            job = {"id": f"while-away-{n}", "prompt": "Hello", "max_tokens": 2}
            assert op.publish(f"edgellm/{a_name}/jobs", job) in ACCEPTED
        process, log_path = launch(default_bundle, broker, pki, tmp_path)
        done: set[str] = set()
        deadline = time.monotonic() + 90
        while len(done) < 3 and time.monotonic() < deadline:
            event = op.next(90).json()
            assert event["event"] != "error", event
            if event["event"] == "done":
                done.add(event["id"])
        assert done == {f"while-away-{n}" for n in range(3)}
        prompts = [ask_prompt(fleet, pki, a_name) for _ in range(2)]
        for prompt in prompts:
            out, err = prompt.communicate(timeout=120)
            assert prompt.returncode == 0, err
            assert f'"device": "{a_name}"' in out.splitlines()[-1]
        assert "already connected, closing old connection" not in broker_log(fleet.broker)
    finally:
        stop_process(process, grace_s=30)

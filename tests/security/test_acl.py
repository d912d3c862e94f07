"""The shipped broker configuration, against a real Mosquitto: who may connect, and what each
identity may read and write. Each test asserts what Mosquitto 2.0 really does (documented at the
top of deploy/mosquitto/acl)."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import Broker
from tests.security.conftest import ACCEPTED, GRANTED_QOS_1, NOT_AUTHORIZED, Pki, broker_log

# --- who may connect ------------------------------------------------------------------------


def test_a_client_without_a_certificate_is_refused(
    pki: Pki, tls_broker: Broker, connect: Any
) -> None:
    anonymous = connect(None, ca=pki.ca, expect=None)
    assert anonymous.connacks.empty(), "the broker accepted a client without a certificate"
    assert "peer did not return a certificate" in broker_log(tls_broker)


def test_a_certificate_from_another_ca_is_refused(
    pki: Pki, tls_broker: Broker, connect: Any
) -> None:
    # Same CN as a real device: only the signature tells them apart.
    rogue = connect(pki.rogue, ca=pki.ca, expect=None)
    assert rogue.connacks.empty(), "the broker accepted a certificate from another CA"
    assert "certificate verify failed" in broker_log(tls_broker)


def test_plain_mqtt_without_tls_gets_no_connack(tls_broker: Broker) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    connacks: list[Any] = []
    client.on_connect = lambda *args: connacks.append(args[3])
    client.connect(tls_broker.host, tls_broker.port)  # TCP only; the CONNECT is sent in clear
    client.loop_start()
    time.sleep(1.5)
    client.loop_stop()
    assert connacks == []


def test_the_client_checks_the_broker_certificate(pki: Pki, tls_broker: Broker) -> None:
    """The server certificate names localhost and 127.0.0.1 and chains to the fleet CA."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.device_a.cert, pki.device_a.key)
    for host in ("localhost", "127.0.0.1"):
        with (
            socket.create_connection(("127.0.0.1", tls_broker.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    other = ssl.create_default_context()  # the system's CAs only: the fleet CA is private
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=5) as raw:
        try:
            other.wrap_socket(raw, server_hostname="localhost")
        except ssl.SSLCertVerificationError:
            pass
        else:
            raise AssertionError("a client without the fleet CA trusted the broker")


# --- what a device may read -------------------------------------------------------------------


def test_a_device_cannot_read_another_devices_jobs(pki: Pki, connect: Any) -> None:
    a = connect(pki.device_a, ca=pki.ca)
    b = connect(pki.device_b, ca=pki.ca)
    operator = connect(pki.operator, ca=pki.ca)
    b_jobs = f"edgellm/{pki.device_b.name}/jobs"
    # Mosquitto 2.0 grants the SUBSCRIBE (it checks read access at delivery time) ...
    assert a.subscribe(b_jobs) == [GRANTED_QOS_1]
    assert a.subscribe("edgellm/#") == [GRANTED_QOS_1]
    assert a.subscribe(f"$share/spy/{b_jobs}") == [GRANTED_QOS_1]
    assert b.subscribe(b_jobs) == [GRANTED_QOS_1]
    assert operator.publish(b_jobs, {"id": "for-b-only", "prompt": "secret"}) in ACCEPTED
    # ... and delivers nothing: B gets its job, A gets nothing through any of the three.
    assert b.next(5, b_jobs).json()["id"] == "for-b-only"
    assert a.received(1.0) == []


def test_devices_take_fleet_jobs_through_the_shared_subscription(pki: Pki, connect: Any) -> None:
    a = connect(pki.device_a, ca=pki.ca)
    b = connect(pki.device_b, ca=pki.ca)
    operator = connect(pki.operator, ca=pki.ca)
    shared = "$share/edgellm/edgellm/fleet/jobs"
    assert a.subscribe(shared) == [GRANTED_QOS_1]
    assert b.subscribe(shared) == [GRANTED_QOS_1]
    for n in range(6):
        assert (
            operator.publish("edgellm/fleet/jobs", {"id": f"fleet-{n}", "prompt": "x"}) in ACCEPTED
        )
    got_a = [m.json()["id"] for m in a.received(1.0)]
    got_b = [m.json()["id"] for m in b.received(0.2)]
    # Each job to exactly one device (Mosquitto's default: round robin).
    assert sorted(got_a + got_b) == [f"fleet-{n}" for n in range(6)]
    assert got_a and got_b


def test_a_device_cannot_read_results_or_status_of_others(pki: Pki, connect: Any) -> None:
    a = connect(pki.device_a, ca=pki.ca)
    b = connect(pki.device_b, ca=pki.ca)
    a.subscribe(f"edgellm/{pki.device_b.name}/#")
    assert b.publish(f"edgellm/{pki.device_b.name}/results/j1", {"id": "j1"}) in ACCEPTED
    assert b.publish(f"edgellm/{pki.device_b.name}/telemetry", {"ts": 1}) in ACCEPTED
    assert a.received(1.0) == []


# --- what a device may write ------------------------------------------------------------------


def test_a_device_cannot_write_another_devices_status(pki: Pki, connect: Any) -> None:
    a = connect(pki.device_a, ca=pki.ca)
    b = connect(pki.device_b, ca=pki.ca)
    operator = connect(pki.operator, ca=pki.ca)
    b_status = f"edgellm/{pki.device_b.name}/status"
    assert b.publish(b_status, {"state": "online"}, retain=True) in ACCEPTED
    operator.subscribe(b_status)
    assert operator.next(5, b_status).json() == {"state": "online"}  # the retained one
    # A forges B's status: refused with PUBACK 0x87; A stays connected; nobody receives it.
    assert a.publish(b_status, {"state": "offline"}, retain=True) == NOT_AUTHORIZED
    assert a.disconnects.empty()
    assert operator.received(1.0) == []
    late = connect(pki.operator, ca=pki.ca)  # the retained status is still B's own
    late.subscribe(b_status)
    assert late.next(5, b_status).json() == {"state": "online"}
    # Its own status, results, telemetry and ota/status it may write.
    own = f"edgellm/{pki.device_a.name}"
    for topic in ("status", "results/j-1", "telemetry", "ota/status"):
        assert a.publish(f"{own}/{topic}", {"ok": True}) in ACCEPTED, topic


def test_a_device_cannot_send_jobs_or_updates(pki: Pki, connect: Any) -> None:
    a = connect(pki.device_a, ca=pki.ca)
    b = connect(pki.device_b, ca=pki.ca)
    b.subscribe(f"edgellm/{pki.device_b.name}/jobs")
    b.subscribe(f"edgellm/{pki.device_b.name}/ota")
    b.subscribe("$share/edgellm/edgellm/fleet/jobs")
    job = {"id": "injected", "prompt": "x"}
    assert a.publish(f"edgellm/{pki.device_b.name}/jobs", job) == NOT_AUTHORIZED
    assert a.publish(f"edgellm/{pki.device_b.name}/ota", {"id": "u"}) == NOT_AUTHORIZED
    assert a.publish("edgellm/fleet/jobs", job) == NOT_AUTHORIZED
    assert a.publish(f"edgellm/{pki.device_a.name}/jobs", job) == NOT_AUTHORIZED  # not even its own
    assert b.received(1.0) == []


# --- the operator -----------------------------------------------------------------------------


def test_the_operator_sends_jobs_and_reads_results_but_cannot_pose_as_a_device(
    pki: Pki, connect: Any
) -> None:
    operator = connect(pki.operator, ca=pki.ca)
    a = connect(pki.device_a, ca=pki.ca)
    own = f"edgellm/{pki.device_a.name}"
    a.subscribe(f"{own}/jobs")
    a.subscribe(f"{own}/jobs/cancel")
    a.subscribe(f"{own}/ota")
    operator.subscribe("edgellm/+/results/#")
    operator.subscribe("edgellm/+/status")
    for topic in ("jobs", "jobs/cancel", "ota"):
        assert operator.publish(f"{own}/{topic}", {"id": "op-1"}) in ACCEPTED, topic
    assert sorted(m.topic for m in a.received(1.0)) == sorted(
        f"{own}/{t}" for t in ("jobs", "jobs/cancel", "ota")
    )
    assert a.publish(f"{own}/results/op-1", {"id": "op-1", "event": "done"}) in ACCEPTED
    assert operator.next(5, f"{own}/results/op-1").json()["event"] == "done"
    assert operator.publish(f"{own}/status", {"state": "offline"}) == NOT_AUTHORIZED
    assert operator.publish(f"{own}/results/op-1", {"id": "op-1"}) == NOT_AUTHORIZED


def test_the_shipped_files_say_what_the_tests_check() -> None:
    """The configuration a site installs is the one tested here (render_config only changes the
    port and the paths), with the security settings that matter."""
    from tests.security.conftest import DEPLOY

    conf = (DEPLOY / "mosquitto.conf").read_text().splitlines()
    for line in (
        "listener 8883",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "acl_file /etc/mosquitto/edgellm/acl",
    ):
        assert line in conf, line
    acl = Path(DEPLOY / "acl").read_text()
    assert "pattern read edgellm/%u/jobs\n" in acl
    assert "pattern read edgellm/fleet/jobs\n" in acl

"""The real agent (`python -m agent run`) behind the fleet broker configuration: mutual TLS with
its device certificate, answering the operator directly and through the shared fleet
subscription, refusing a forged MQTT v5 Response Topic itself (the `reply_topics` setting that
jetson/provision.sh writes), and stopping at once on SIGTERM while its broker is unreachable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.local_broker import free_port, stop_process
from tests.conftest import Broker
from tests.security.conftest import Pki, TlsClient, broker_log

pytestmark = pytest.mark.session_bundle


def agent_config(pki: Pki) -> str:
    return (
        "[mqtt]\n"
        f'ca_file = "{pki.ca}"\n'
        f'cert_file = "{pki.device_a.cert}"\n'
        f'key_file = "{pki.device_a.key}"\n'
        "reconnect_max_s = 2.0\n"
        'reply_topics = ["{prefix}/{device}/results/#"]\n'
        "[jobs]\nmax_tokens_limit = 64\n"
    )


def launch(
    bundle: Path, broker: str, pki: Pki, workdir: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """`python -m agent run` as device A (its id is its certificate's CN)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "agent.toml").write_text(agent_config(pki))
    log_path = workdir / "agent.log"
    args = [
        sys.executable, "-m", "agent", "run", "--config", str(workdir / "agent.toml"),
        "--bundle", str(bundle), "--broker", broker,
        "--device-id", pki.device_a.name, "--state-dir", str(workdir / "state"),
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, env=dict(os.environ)
    )
    return process, log_path


def wait_connected_or_not(process: subprocess.Popen[bytes], log_path: Path) -> str:
    """The agent's log once it connected, or was dropped by the broker twice, or gave up."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log = log_path.read_text(errors="replace")
        dropped = log.count("disconnected from the broker") >= 2
        if "connected to" in log or dropped or process.poll() is not None:
            return log
        time.sleep(0.2)
    return log_path.read_text(errors="replace")


def ask(operator: TlsClient, topic: str, job: dict[str, Any], reply: str, **kw: Any) -> Any:
    operator.publish(topic, job, **kw)
    while True:
        event = operator.next(60, reply).json()
        if event["event"] in ("done", "error"):
            return event


@pytest.fixture(scope="module")
def tls_agent(
    default_bundle: Path, pki: Pki, tls_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The agent as device A, connected to the fleet broker over mutual TLS."""
    process, log_path = launch(
        default_bundle, f"localhost:{tls_broker.port}", pki, tmp_path_factory.mktemp("tls-agent")
    )
    log = wait_connected_or_not(process, log_path)
    if "connected to" not in log:
        stop_process(process, grace_s=30)
        pytest.fail(f"the agent did not connect over TLS:\n{log[-3000:]}")
    yield log_path
    stop_process(process, grace_s=30)
    assert process.returncode == 0, log_path.read_text()[-3000:]


def test_agent_with_its_device_certificate_answers_the_operator(
    tls_agent: Path, pki: Pki, connect: Any
) -> None:
    operator = connect(pki.operator, ca=pki.ca)
    device = pki.device_a.name
    operator.subscribe(f"edgellm/{device}/status")
    assert operator.next(30, f"edgellm/{device}/status").json()["state"] == "online"
    reply = f"edgellm/{device}/results/op-direct"
    operator.subscribe(reply)
    job = {"id": "op-direct", "prompt": "The capital of France is", "max_tokens": 4}
    assert ask(operator, f"edgellm/{device}/jobs", job, reply)["event"] == "done"
    # A fleet job reaches it through the shared subscription the ACL allows.
    fleet_reply = f"edgellm/{device}/results/op-fleet"
    operator.subscribe(fleet_reply)
    job = {"id": "op-fleet", "prompt": "Hello", "max_tokens": 2}
    assert ask(operator, "edgellm/fleet/jobs", job, fleet_reply)["device"] == device


def test_a_forged_response_topic_is_refused_by_the_agent(
    tls_agent: Path, pki: Pki, tls_broker: Broker, connect: Any
) -> None:
    """The operator asks device A to answer into B's results (posing as B) and into B's job
    queue (using A to inject a job): A refuses both on its own results topic, saying why, and
    publishes nothing under B (the broker's ACL would drop it too: tests/security/test_acl.py)."""
    a, b = pki.device_a.name, pki.device_b.name
    operator = connect(pki.operator, ca=pki.ca)
    device_b = connect(pki.device_b, ca=pki.ca)
    operator.subscribe(f"edgellm/{b}/results/#")  # the operator may read B's results
    operator.subscribe(f"edgellm/{a}/results/#")
    device_b.subscribe(f"edgellm/{b}/jobs")
    jobs = f"edgellm/{a}/jobs"
    forged = {
        "forge-1": f"edgellm/{b}/results/stolen",
        "forge-2": f"edgellm/{b}/jobs",
    }
    for job_id, topic in forged.items():
        job = {"id": job_id, "prompt": "Hi", "max_tokens": 2}
        operator.publish(jobs, job, response_topic=topic, correlation_data=b"c")
        refusal = operator.next(60, f"edgellm/{a}/results/{job_id}").json()
        assert refusal["event"] == "error", refusal
        assert refusal["error"]["code"] == "invalid_request"
        assert topic in refusal["error"]["message"]
    # A legitimate Response Topic inside A's own space works, and comes after the forged ones.
    reply = f"edgellm/{a}/results/mine/1"
    done = ask(
        operator,
        jobs,
        {"id": "legit", "prompt": "Hi", "max_tokens": 2},
        reply,
        response_topic=reply,
        correlation_data=b"legit",
    )
    assert done["event"] == "done"
    time.sleep(1.0)
    leaked = [m for m in operator.received(0.5) if m.topic.startswith(f"edgellm/{b}/")]
    assert leaked == []
    assert device_b.received(0.5) == []
    denied = [line for line in broker_log(tls_broker).splitlines() if "Denied PUBLISH" in line]
    assert not any(f"edgellm/{b}/" in line for line in denied)  # never even tried


def test_sigterm_while_the_broker_is_unreachable_stops_at_once(
    default_bundle: Path, pki: Pki, tmp_path: Path
) -> None:
    """Nothing listens on the port: the agent keeps retrying; SIGTERM ends it within seconds,
    not after the next 10 s wait (systemd's stop would otherwise stall and end in SIGKILL)."""
    process, log_path = launch(default_bundle, f"localhost:{free_port()}", pki, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while "verified and loaded" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the agent did not load its bundle"
            time.sleep(0.2)
        time.sleep(1.0)  # now inside the wait for the broker
        process.terminate()
        started = time.monotonic()
        process.wait(30)
        stopped_in = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, log_path.read_text()[-3000:]
    # A bound on behaviour, not a speed figure: the old loop only looked at SIGTERM every 10 s.
    assert stopped_in < 8.0, f"SIGTERM took {stopped_in:.1f} s"


def test_edge_fleet_prompt_reaches_the_agent_over_mutual_tls(
    tls_agent: Path, pki: Pki, tls_broker: Broker
) -> None:
    """The operator's tool with its certificate (`--ca/--cert/--key`), to a device and to the
    fleet."""
    for target in (["--device", pki.device_a.name], ["--fleet"]):
        result = subprocess.run(
            [sys.executable, "-m", "fleet", "prompt", "Hi", *target, "--max-tokens", "4",
             "--broker", f"localhost:{tls_broker.port}", "--ca", str(pki.ca),
             "--cert", str(pki.operator.cert), "--key", str(pki.operator.key), "--json",
             "--timeout", "60"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f'"device": "{pki.device_a.name}"' in result.stdout.splitlines()[-1]

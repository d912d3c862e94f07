"""Over-the-air updates end to end: a real agent process, a real HTTP server with Range, real
Mosquitto, real bundles, real Ed25519 signatures."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import MANIFEST_NAME, file_table
from agent.config import MqttConfig
from fleet.pack import pack_bundle
from fleet.rollout import WavePlan, rollout
from fleet.serve import FileServer
from fleet.signing import generate_keypair, sign_bundle
from fleet.update import make_command
from tests.conftest import AgentProcess, Broker, MqttProbe, start_agent, wait_status
from tests.ota.hold import hold_env

pytestmark = pytest.mark.session_bundle
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Fleet:
    """Keys, the served directory and the bundles of one test."""

    root: Path
    key: Path
    trusted_dir: Path
    server: FileServer
    base: Path  # version 1, what the agent starts with

    def bundle(self, version: str, *, sign: bool = True, key: Path | None = None) -> Path:
        """A copy of the base bundle as `version` (same weights, new manifest), signed."""
        out = self.root / f"bundle-{version}"
        shutil.copytree(self.base, out)
        rewrite_manifest(out, version=version)
        if sign:
            sign_bundle(out, key or self.key)
        return out

    def publish(self, bundle: Path, *, allow_unsigned: bool = False) -> dict[str, Any]:
        """Pack into the served directory; the update command for it."""
        name = f"{bundle.name}.tar"
        packed = pack_bundle(bundle, self.server_dir / name, allow_unsigned=allow_unsigned)
        return {
            "url": self.server.url_for(name),
            "sha256": packed.sha256,
            "size": packed.size,
            "version": packed.version,
        }

    def publish_raw(self, name: str, data: bytes) -> dict[str, Any]:
        (self.server_dir / name).write_bytes(data)
        return {
            "url": self.server.url_for(name),
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "version": "x",
        }

    @property
    def server_dir(self) -> Path:
        return self.root / "www"


def rewrite_manifest(bundle: Path, **changes: Any) -> None:
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest.update(changes)
    manifest["files"] = file_table(bundle)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    (bundle / "manifest.sig").unlink(missing_ok=True)


@pytest.fixture
def fleet(tmp_path: Path, default_bundle: Path) -> Iterator[Fleet]:
    keys = tmp_path / "keys"
    key, pub = generate_keypair(keys, "fleet")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(pub, trusted / "fleet.pub")
    (tmp_path / "www").mkdir()
    base = tmp_path / "bundle-1"
    shutil.copytree(default_bundle, base)
    rewrite_manifest(base, version="1")
    with FileServer(tmp_path / "www") as server:
        yield Fleet(tmp_path, key, trusted, server, base)


def agent_config(fleet: Fleet, extra: str = "") -> str:
    return f'[ota]\ntrusted_keys_dir = "{fleet.trusted_dir}"\nprobation_window_s = 600.0\n' + extra


def start(fleet: Fleet, broker: Broker, probe: MqttProbe, **kwargs: Any) -> AgentProcess:
    config = kwargs.pop("config", agent_config(fleet))
    agent = start_agent(fleet.base, broker, fleet.root / "agent", config=config, **kwargs)
    probe.subscribe(f"edgellm/{agent.device}/ota/status")
    wait_status(probe, agent.device, "online")
    return agent


def restart(agent: AgentProcess, fleet: Fleet, broker: Broker, probe: MqttProbe) -> AgentProcess:
    again = start_agent(
        fleet.base, broker, fleet.root / "agent", device=agent.device, config=agent_config(fleet)
    )
    wait_status(probe, again.device, "online", timeout=120)
    return again


def update(probe: MqttProbe, device: str, update_id: str, command: dict[str, Any]) -> None:
    probe.publish(f"edgellm/{device}/ota", {"id": update_id, **command})


def ota_final(
    probe: MqttProbe,
    device: str,
    update_id: str,
    timeout: float = 180,
    states: tuple[str, ...] = ("active", "failed", "rolled_back"),
) -> dict[str, Any]:
    topic = f"edgellm/{device}/ota/status"
    deadline = time.monotonic() + timeout
    while True:
        status = probe.next(deadline - time.monotonic(), topic).json()
        if status["id"] == update_id and status["state"] in states:
            return dict(status)


def wait_ota_state(probe: MqttProbe, device: str, state: str, timeout: float = 120) -> None:
    topic = f"edgellm/{device}/ota/status"
    deadline = time.monotonic() + timeout
    while probe.next(deadline - time.monotonic(), topic).json()["state"] != state:
        pass


def answer(probe: MqttProbe, device: str, job_id: str) -> dict[str, Any]:
    topic = f"edgellm/{device}/results/{job_id}"
    probe.subscribe(topic)
    probe.publish(f"edgellm/{device}/jobs", {"id": job_id, "messages": CAPITAL, "max_tokens": 12})
    events = probe.events_until_final(topic, timeout=120)
    assert events[-1]["event"] == "done", events
    return events[-1]


def test_happy_path_with_jobs_throughout(fleet: Fleet, broker: Broker, probe: MqttProbe) -> None:
    command = fleet.publish(fleet.bundle("2"))
    agent = start(fleet, broker, probe)
    try:
        device = agent.device
        results = f"edgellm/{device}/results/#"
        probe.subscribe(results)
        update(probe, device, "up-1", command)
        sent = 0
        final = None
        # Jobs keep arriving during the whole update; every one must be answered.
        while final is None:
            probe.publish(
                f"edgellm/{device}/jobs",
                {"id": f"during-{sent}", "messages": CAPITAL, "max_tokens": 8},
            )
            sent += 1
            time.sleep(1.0)  # a steady load the device can carry while it tests the new bundle
            probe.drain()
            for message in list(probe.pending):
                if message.topic.endswith("/ota/status"):
                    status = message.json()
                    if status["id"] == "up-1" and status["state"] in ("active", "failed"):
                        final = status
        assert final["state"] == "active", final
        done: dict[str, dict[str, Any]] = {}
        while len(done) < sent:
            event = probe.next(120, None).json()
            if event.get("event") in ("done", "error"):
                done[event["id"]] = event
        assert all(e["event"] == "done" for e in done.values()), [
            e for e in done.values() if e["event"] != "done"
        ]
        versions = {e["engine"]["version"] for e in done.values()}
        assert versions <= {"1", "2"} and "1" in versions
        longest = max(e["timing"]["total_ms"] for e in done.values())
        print(f"\n{sent} jobs during the update, all answered; slowest {longest:.0f} ms")
        assert answer(probe, device, "after")["engine"]["version"] == "2"
        online = wait_status(probe, device, "online")
        assert online["engine"]["version"] == "2"
    finally:
        agent.stop()


def engine_bundle_for_another_device(fleet: Fleet) -> Path:
    """A signed TensorRT engine bundle built for a Jetson AGX Orin: genuine, but not for this
    machine, which has no NVIDIA GPU."""
    bundle = fleet.bundle("orin-engine", sign=False)
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx.data").unlink()
    (bundle / "engine.plan").write_bytes(os.urandom(4096))
    target = {"device": "Jetson AGX Orin", "compute_capability": "8.7", "sm_count": 16,
              "tensorrt": "10.3.0", "cuda": "12.6", "jetpack": "6.2"}  # fmt: skip
    rewrite_manifest(bundle, backend="tensorrt", target=target)
    sign_bundle(bundle, fleet.key)
    return bundle


def traversal_tar(fleet: Fleet) -> bytes:
    path = fleet.root / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 4
        tar.addfile(info, fileobj=io.BytesIO(b"evil"))
    return path.read_bytes()


def test_refusals_leave_the_running_model_untouched(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    other_key, _ = generate_keypair(fleet.root / "other-keys", "intruder")
    changed = fleet.bundle("tampered")
    tok = changed / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("<|im_end|>", "<|im_END|>", 1))  # after signing
    good = fleet.publish(fleet.bundle("2"))
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("corrupt", fleet.publish_raw("junk.tar", os.urandom(50_000)), "bad_archive"),
        ("sha", {**good, "sha256": "0" * 64}, "bad_checksum"),
        ("unsigned", fleet.publish(fleet.bundle("u", sign=False), allow_unsigned=True), "unsigned"),
        ("untrusted", fleet.publish(fleet.bundle("k", key=other_key)), "untrusted"),
        ("traversal", fleet.publish_raw("evil.tar", traversal_tar(fleet)), "bad_archive"),
        ("space", {**good, "size": 1 << 40}, "no_space"),
    ]
    cases.append(
        ("target", fleet.publish(engine_bundle_for_another_device(fleet)), "target_mismatch")
    )
    changed_tar = fleet.root / "www" / "tampered.tar"
    with tarfile.open(changed_tar, "w") as tar:  # packed by hand: pack_bundle refuses it
        for item in sorted(changed.iterdir()):
            tar.add(item, arcname=item.name)
    data = changed_tar.read_bytes()
    cases.append(("changed", fleet.publish_raw("tampered.tar", data), "tampered"))
    agent = start(
        fleet, broker, probe, config=agent_config(fleet, "max_bundle_bytes = 2199023255552\n")
    )
    try:
        for name, command, code in cases:
            update(probe, agent.device, f"bad-{name}", command)
            final = ota_final(probe, agent.device, f"bad-{name}")
            assert final["state"] == "failed", (name, final)
            assert final["error"]["code"] == code, (name, final)
            assert final["error"]["message"]
            assert answer(probe, agent.device, f"after-{name}")["engine"]["version"] == "1"
        assert not (fleet.root / "escaped.txt").exists()
        assert not (fleet.root / "agent" / "state" / "bundles" / "current").exists()
    finally:
        agent.stop()


def test_bundle_whose_canaries_fail_is_rolled_back(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    wrong = fleet.bundle("bad-golden", sign=False)
    golden = json.loads((wrong / "golden.json").read_text())
    golden["canaries"][0]["token_ids"][1] += 1  # what this model would never say
    (wrong / "golden.json").write_text(json.dumps(golden))
    rewrite_manifest(wrong)
    sign_bundle(wrong, fleet.key)
    agent = start(fleet, broker, probe)
    try:
        update(probe, agent.device, "canary-1", fleet.publish(wrong))
        final = ota_final(probe, agent.device, "canary-1")
        assert final["state"] == "rolled_back" and final["error"]["code"] == "canary_failed"
        assert "capital" in final["error"]["message"]
        assert answer(probe, agent.device, "still-v1")["engine"]["version"] == "1"
    finally:
        agent.stop()


@pytest.mark.slow
@pytest.mark.parametrize("state", ["downloading", "verifying", "testing", "switching"])
def test_sigkill_in_every_state_ends_on_a_working_bundle(
    fleet: Fleet, broker: Broker, probe: MqttProbe, state: str
) -> None:
    command = fleet.publish(fleet.bundle("2"))
    hold = {} if state == "downloading" else hold_env(**{state: 60})
    if state == "downloading":
        fleet.server.knobs.rate_bytes_per_s = 20_000_000  # ~30 s for the bundle: time to kill
    agent = start(fleet, broker, probe, env=hold)
    try:
        update(probe, agent.device, "kill-1", command)
        if state == "switching":  # reported as a second `testing` (DESIGN.md has no switching)
            wait_ota_state(probe, agent.device, "testing")
        wait_ota_state(probe, agent.device, "testing" if state == "switching" else state)
        time.sleep(0.5)
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(10)
        fleet.server.knobs.rate_bytes_per_s = None
        agent = restart(agent, fleet, broker, probe)
        final = ota_final(probe, agent.device, "kill-1")
        assert final["state"] == "active", final  # resumed and finished
        assert answer(probe, agent.device, "after-kill")["engine"]["version"] == "2"
    finally:
        agent.stop()


@pytest.mark.slow
def test_probation_rolls_back_after_repeated_crashes(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    command = fleet.publish(fleet.bundle("2"))
    agent = start(fleet, broker, probe)
    try:
        update(probe, agent.device, "prob-1", command)
        assert ota_final(probe, agent.device, "prob-1")["state"] == "active"
        for _ in range(3):  # the default probation: 3 abnormal exits within the window
            agent.process.send_signal(signal.SIGKILL)
            agent.process.wait(10)
            agent = restart(agent, fleet, broker, probe)
        final = ota_final(probe, agent.device, "prob-1", states=("rolled_back",))
        assert final["error"]["code"] == "probation_failed"
        assert answer(probe, agent.device, "after-rollback")["engine"]["version"] == "1"
    finally:
        agent.stop()


@pytest.mark.slow
def test_a_rollout_over_real_agents_halts_on_a_failure_and_spares_the_later_waves(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    """`fleet.rollout` against three real agents. The canary device trusts another signing key,
    so it refuses the update for real (bad signature); with no failure allowed the rollout halts
    and the other two never receive the command. A second rollout without it updates both."""
    other_keys = fleet.root / "other-keys"
    _, other_pub = generate_keypair(other_keys, "other")
    other_trusted = fleet.root / "other-trusted"
    other_trusted.mkdir()
    shutil.copy(other_pub, other_trusted / "other.pub")
    config = f'[ota]\ntrusted_keys_dir = "{other_trusted}"\n'
    agents = [start_agent(fleet.base, broker, fleet.root / "untrusting", config=config)]
    agents += [
        start_agent(fleet.base, broker, fleet.root / name, config=agent_config(fleet))
        for name in ("good-1", "good-2")
    ]
    mqtt = MqttConfig(host=broker.host, port=broker.port, session_expiry_s=0)
    command = fleet.publish(fleet.bundle("2"))
    try:
        for agent in agents:
            wait_status(probe, agent.device, "online")
            probe.subscribe(f"edgellm/{agent.device}/ota/status")
        devices = [a.device for a in agents]
        halted = rollout(
            mqtt, devices,
            make_command("wave-test-1", command["url"], command["sha256"], command["size"], "2"),
            WavePlan(canary=1, max_failures=0, per_device_timeout_s=120),
        )  # fmt: skip
        assert halted.halted and halted.waves_run == 1
        untrusting, *good = halted.results
        assert untrusting.state == "failed", untrusting
        assert "[untrusted]" in (untrusting.error or ""), untrusting
        assert [r.state for r in good] == ["skipped", "skipped"]
        time.sleep(1.0)
        probe.drain()
        spared = [
            m.topic
            for m in probe.pending
            if m.topic.endswith("/ota/status") and m.json().get("id") == "wave-test-1"
            and devices[0] not in m.topic
        ]  # fmt: skip
        assert spared == [], "a device of a later wave received the halted update"
        assert all(answer(probe, d, f"v1-{n}")["engine"]["version"] == "1"
                   for n, d in enumerate(devices))  # fmt: skip

        completed = rollout(
            mqtt, devices[1:],
            make_command("wave-test-2", command["url"], command["sha256"], command["size"], "2"),
            WavePlan(canary=1, max_failures=0, per_device_timeout_s=120),
        )  # fmt: skip
        assert not completed.halted and completed.waves_run == 2, completed.to_json()
        assert [r.state for r in completed.results] == ["active", "active"]
        for n, device in enumerate(devices[1:]):
            assert answer(probe, device, f"v2-{n}")["engine"]["version"] == "2"
    finally:
        for agent in agents:
            agent.stop()

"""The OTA promises end to end: real agent processes, real Mosquitto, real bundles and Ed25519
signatures, real HTTP servers (`edge-fleet serve`, and hostile `http.server`s that trickle,
redirect to another origin, or serve a gzip bomb), a real small tmpfs for a state disk that
fills."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import MANIFEST_NAME
from fleet.cli import main as fleet_cli
from fleet.signing import generate_keypair, sign_bundle
from tests.conftest import Broker, MqttProbe, fill, mounted_tmpfs, wait_status
from tests.ota import test_ota_agent
from tests.ota.hold import hold_env
from tests.ota.test_ota_agent import (
    Fleet,
    agent_config,
    answer,
    ota_final,
    restart,
    rewrite_manifest,
    start,
    update,
    wait_ota_state,
)
from tests.ota.test_ota_promise_parts import Trickle, gzip_bomb, redirector, serve

pytestmark = pytest.mark.session_bundle
fleet = test_ota_agent.fleet  # the fixture: keys, served directory, bundles of one test


def state_dir(fleet: Fleet) -> Path:
    return fleet.root / "agent" / "state"


def slot_versions(fleet: Fleet) -> dict[str, str]:
    """The version in each A/B slot that holds a manifest."""
    bundles = state_dir(fleet) / "bundles"
    return {
        slot: json.loads((bundles / slot / MANIFEST_NAME).read_text())["version"]
        for slot in ("a", "b")
        if (bundles / slot / MANIFEST_NAME).is_file()
    }


def downloads(fleet: Fleet) -> list[str]:
    directory = state_dir(fleet) / "ota" / "download"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def refused(probe: MqttProbe, device: str, update_id: str, code: str) -> dict[str, Any]:
    final = ota_final(probe, device, update_id)
    assert final["state"] == "failed", final
    assert final["error"]["code"] == code, final
    return final


def bad_golden_bundle(fleet: Fleet, version: str) -> Path:
    """Genuine and signed, but its golden answers are not what this model says."""
    wrong = fleet.bundle(version, sign=False)
    golden = json.loads((wrong / "golden.json").read_text())
    golden["canaries"][0]["token_ids"][1] += 1
    (wrong / "golden.json").write_text(json.dumps(golden))
    rewrite_manifest(wrong)
    sign_bundle(wrong, fleet.key)
    return wrong


@pytest.fixture
def trickle() -> Iterator[str]:
    yield from serve(Trickle)


# --- anti-rollback and replays ---------------------------------------------------------------


@pytest.mark.slow
def test_downgrades_and_version_mismatches_are_refused_unless_allowed(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    v2 = fleet.publish(fleet.bundle("2"))
    older = fleet.publish(fleet.bundle("0.9"))
    v3 = fleet.publish(fleet.bundle("3"))
    agent = start(fleet, broker, probe)
    try:
        device = agent.device
        update(probe, device, "to-2", v2)
        assert ota_final(probe, device, "to-2")["state"] == "active"
        update(probe, device, "again-2", v2)  # the same version: not newer
        assert "same version" in refused(probe, device, "again-2", "downgrade")["error"]["message"]
        update(probe, device, "older", older)  # validly signed, older
        assert "older than" in refused(probe, device, "older", "downgrade")["error"]["message"]
        update(probe, device, "lying", {**v3, "version": "4"})  # says 4, the bundle is 3
        refused(probe, device, "lying", "version_mismatch")
        assert answer(probe, device, "still-2")["engine"]["version"] == "2"
        assert slot_versions(fleet) == {"a": "2"}  # every refused candidate was removed
        assert downloads(fleet) == []

        # The operator's deliberate rollback, through the fleet tool's flag.
        exit_code = fleet_cli([
            "update", "--device", device, "--url", older["url"], "--sha256", older["sha256"],
            "--size", str(older["size"]), "--version", "0.9", "--id", "rollback",
            "--allow-downgrade", "--broker", broker.address, "--timeout", "180",
        ])  # fmt: skip
        assert exit_code == 0
        final = ota_final(probe, device, "rollback")
        assert final["state"] == "active" and final["version"] == "0.9", final
        assert answer(probe, device, "on-0.9")["engine"]["version"] == "0.9"
        # The mark stays at 2 through the rollback: 2 again is still refused.
        update(probe, device, "2-again", v2)
        refused(probe, device, "2-again", "downgrade")
    finally:
        agent.stop()


def test_a_finished_update_id_sent_again_is_not_run_again(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    v2 = fleet.publish(fleet.bundle("2"))
    v3 = fleet.publish(fleet.bundle("3"))
    agent = start(fleet, broker, probe)
    try:
        device = agent.device
        update(probe, device, "first", v2)
        first = ota_final(probe, device, "first")
        assert first["state"] == "active"
        update(probe, device, "second", v3)
        assert ota_final(probe, device, "second")["state"] == "active"
        update(probe, device, "first", v2)  # replayed, and no longer the last update
        again = ota_final(probe, device, "first", states=("downloading", "active", "failed"))
        assert again == first  # its final status, repeated; nothing ran
        assert answer(probe, device, "on-3")["engine"]["version"] == "3"
        assert slot_versions(fleet) == {"a": "2", "b": "3"}
    finally:
        agent.stop()


# --- nothing unverified in a slot, nothing unverified boots ---------------------------------


def test_a_bundle_refused_for_its_signature_is_removed_and_never_served(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    intruder, _ = generate_keypair(fleet.root / "intruder-keys", "intruder")
    v2 = fleet.publish(fleet.bundle("2"))
    forged = fleet.publish(fleet.bundle("3", key=intruder))
    agent = start(fleet, broker, probe)
    try:
        device = agent.device
        update(probe, device, "to-2", v2)
        assert ota_final(probe, device, "to-2")["state"] == "active"
        update(probe, device, "forged", forged)
        refused(probe, device, "forged", "untrusted")
        assert slot_versions(fleet) == {"a": "2"}, "the refused bundle stayed in its slot"
        assert downloads(fleet) == []
        agent.stop()
        # The current slot breaks (a disk error, say): the boot falls back, but never to a
        # bundle that was refused.
        golden = state_dir(fleet) / "bundles" / "a" / "golden.json"
        golden.write_text(golden.read_text().replace("1", "2", 1))
        agent = restart(agent, fleet, broker, probe)
        assert answer(probe, device, "after-restart")["engine"]["version"] == "1"
    finally:
        agent.stop()


@pytest.mark.slow
def test_a_bundle_whose_canaries_failed_is_never_served_after_a_probation_rollback(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    """2 in slot a, 3 in slot b (on probation, its way back is slot a), then 4 fails its
    canaries in slot a. Slot a must not be what the probation rolls back to."""
    v2 = fleet.publish(fleet.bundle("2"))
    v3 = fleet.publish(fleet.bundle("3"))
    v4 = fleet.publish(bad_golden_bundle(fleet, "4"))
    agent = start(fleet, broker, probe)
    try:
        device = agent.device
        for update_id, command in (("to-2", v2), ("to-3", v3)):
            update(probe, device, update_id, command)
            assert ota_final(probe, device, update_id)["state"] == "active"
        update(probe, device, "to-4", v4)
        final = ota_final(probe, device, "to-4")
        assert final["state"] == "rolled_back" and final["error"]["code"] == "canary_failed"
        assert slot_versions(fleet) == {"b": "3"}
        for n in range(3):  # the default probation: 3 abnormal exits within the window
            agent.process.send_signal(signal.SIGKILL)
            agent.process.wait(10)
            agent = restart(agent, fleet, broker, probe)
            # Answered by the new process (the retained "online" may be its predecessor's).
            served = answer(probe, device, f"alive-{n}")["engine"]["version"]
            assert served == ("3" if n < 2 else "1"), (n, served)
        assert slot_versions(fleet) == {}  # neither the failed candidate nor the crashing one
        update(probe, device, "to-3", v3)  # what became of it? Said again, not run again:
        rolled = ota_final(probe, device, "to-3")
        assert rolled["state"] == "rolled_back", rolled
        assert rolled["error"]["code"] == "probation_failed"
        assert answer(probe, device, "after-rollback")["engine"]["version"] == "1"
    finally:
        agent.stop()


# --- archives and the state disk -------------------------------------------------------------


def test_a_gzip_bomb_is_refused_and_leaves_nothing_behind(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    """A 2 MB archive, signed manifest included, whose weights entry unpacks to 2 GiB. The state
    dir is a 1 GiB disk: unpacked before being checked, the bomb would fill it."""
    bundle = fleet.bundle("2")
    bomb = gzip_bomb(bundle, fleet.root / "bomb.tar.gz", "model.onnx.data", 2 << 30)
    command = {**fleet.publish_raw("bomb.tar.gz", bomb.read_bytes()), "version": "2"}
    with mounted_tmpfs(state_dir(fleet), "1g"):
        agent = start(fleet, broker, probe)
        try:
            update(probe, agent.device, "bomb", command)
            final = refused(probe, agent.device, "bomb", "bad_archive")
            assert "2147483648 bytes" in final["error"]["message"]
            assert slot_versions(fleet) == {}
            assert not (state_dir(fleet) / "bundles" / "a").exists()
            assert downloads(fleet) == []
            assert answer(probe, agent.device, "after-bomb")["engine"]["version"] == "1"
        finally:
            agent.stop()


def test_a_state_disk_that_fills_during_an_update_ends_failed_and_jobs_go_on(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    """The disk fills (something else wrote to it) between the download and the unpacking:
    the update ends `failed` with `no_space`, never stays `verifying`, and jobs are answered."""
    bundle = fleet.bundle("2")
    small = gzip_bomb(bundle, fleet.root / "small.tar.gz", "model.onnx.data", 64 << 20)
    command = {**fleet.publish_raw("small.tar.gz", small.read_bytes()), "version": "2"}
    with mounted_tmpfs(state_dir(fleet), "128m") as disk:
        agent = start(fleet, broker, probe, env=hold_env(verifying=3))
        try:
            update(probe, agent.device, "full", command)
            wait_ota_state(probe, agent.device, "verifying")
            filler = fill(disk)
            final = refused(probe, agent.device, "full", "no_space")
            assert final["error"]["message"]
            assert answer(probe, agent.device, "disk-full")["engine"]["version"] == "1"
            filler.unlink()
            assert slot_versions(fleet) == {} and downloads(fleet) == []
            assert answer(probe, agent.device, "disk-freed")["engine"]["version"] == "1"
        finally:
            agent.stop()


# --- downloads -------------------------------------------------------------------------------


TRICKLE_COMMAND = {"sha256": "0" * 64, "size": 100000, "version": "2"}


def test_a_trickling_server_ends_download_failed_and_a_later_update_succeeds(
    fleet: Fleet, broker: Broker, probe: MqttProbe, trickle: str
) -> None:
    limits = "download_deadline_s = 8\ndownload_min_rate_bps = 1000\ndownload_rate_window_s = 2\n"
    agent = start(fleet, broker, probe, config=agent_config(fleet, limits))
    try:
        device = agent.device
        update(probe, device, "trickled", {"url": f"{trickle}/a.tar", **TRICKLE_COMMAND})
        final = refused(probe, device, "trickled", "download_failed")
        assert "download_deadline_s" in final["error"]["message"], final
        assert downloads(fleet) == []
        update(probe, device, "honest", fleet.publish(fleet.bundle("2")))
        assert ota_final(probe, device, "honest")["state"] == "active"
        assert answer(probe, device, "on-2")["engine"]["version"] == "2"
    finally:
        agent.stop()


def test_a_newer_command_supersedes_a_wedged_download_but_not_a_test(
    fleet: Fleet, broker: Broker, probe: MqttProbe, trickle: str
) -> None:
    fresh = fleet.publish(fleet.bundle("2"))
    late = fleet.publish(fleet.bundle("3"))
    agent = start(fleet, broker, probe, env=hold_env(testing=5))
    try:
        device = agent.device
        update(probe, device, "wedged", {"url": f"{trickle}/a.tar", **TRICKLE_COMMAND})
        wait_ota_state(probe, device, "downloading")
        update(probe, device, "fresh", fresh)
        superseded = refused(probe, device, "wedged", "superseded")
        assert "fresh" in superseded["error"]["message"]
        wait_ota_state(probe, device, "testing")
        update(probe, device, "late", late)
        busy = refused(probe, device, "late", "busy")
        assert "fresh" in busy["error"]["message"]
        assert ota_final(probe, device, "fresh")["state"] == "active"
        assert answer(probe, device, "on-2")["engine"]["version"] == "2"
        assert downloads(fleet) == []
    finally:
        agent.stop()


def test_a_redirect_to_another_origin_is_refused(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    command = fleet.publish(fleet.bundle("2"))
    target = command["url"]  # `edge-fleet serve` on another port: another origin
    agent = start(fleet, broker, probe)
    try:
        for redirect in serve(redirector(target)):
            update(probe, agent.device, "moved", {**command, "url": f"{redirect}/moved.tar"})
            final = refused(probe, agent.device, "moved", "download_failed")
            assert target in final["error"]["message"] and "follow_redirects" in str(final)
        assert downloads(fleet) == []
        assert answer(probe, agent.device, "still-1")["engine"]["version"] == "1"
        assert wait_status(probe, agent.device, "online")["engine"]["version"] == "1"
    finally:
        agent.stop()

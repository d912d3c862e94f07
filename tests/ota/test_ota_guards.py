"""The installer's guards against a candidate that would take the device down rather than fail a
check: the memory check before it is loaded beside the serving model (`no_memory`), and the cap on
verify-and-test attempts that a candidate killing the agent would otherwise repeat forever
(`crash_loop`)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import Manifest, parse_manifest
from agent.config import OtaConfig, RuntimeConfig
from agent.ota.command import parse_update_command
from agent.ota.errors import OtaError
from agent.ota.installer import OtaHooks, OtaInstaller
from agent.ota.memory import LOAD_FACTOR, RESERVE_BYTES, check_fits, read_mem_available
from agent.ota.probation import ProbationGuard
from agent.ota.slots import Slots
from agent.ota.store import FinishedLog, OtaRecord, OtaStateName, OtaStore
from agent.runtime import LoadedModel
from fleet.pack import pack_bundle
from fleet.serve import FileServer
from tests.conftest import (
    AgentProcess,
    Broker,
    MqttProbe,
    make_synthetic_bundle,
    start_agent,
    wait_status,
)
from tests.ota import test_ota_agent
from tests.ota.hold import hold_env
from tests.ota.test_ota_agent import (
    Fleet,
    agent_config,
    answer,
    ota_final,
    start,
    update,
)
from tests.ota.test_ota_parts import command_bytes

fleet = test_ota_agent.fleet  # the fixture: keys, served directory, bundles of one test
MIB = 1 << 20


# --- reading the free memory -----------------------------------------------------------------


MEMINFO = """MemTotal:       24684052 kB
MemFree:        21083432 kB
MemAvailable:   23540676 kB
Buffers:          150488 kB
"""


def test_mem_available_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    assert read_mem_available(meminfo) == 23540676 * 1024
    meminfo.write_text("MemTotal: 1000 kB\nMemFree: 500 kB\n")  # a kernel older than 3.14
    assert read_mem_available(meminfo) is None
    assert read_mem_available(tmp_path / "absent") is None


def test_this_linux_reports_mem_available() -> None:
    available = read_mem_available()
    assert available is not None and available > 64 * MIB


# --- the fit check ---------------------------------------------------------------------------


def manifest_of(tmp_path: Path, weights: int) -> Manifest:
    bundle = make_synthetic_bundle(tmp_path / f"b-{weights}", files={"model.onnx": b"x" * weights})
    return parse_manifest(json.loads((bundle / "manifest.json").read_text()))


def test_a_candidate_that_fits_passes(tmp_path: Path) -> None:
    manifest = manifest_of(tmp_path, 4 * MIB)
    needed = int(4 * MIB * LOAD_FACTOR) + RESERVE_BYTES
    check_fits(manifest, lambda: needed)  # exactly enough
    check_fits(manifest, lambda: None)  # unknown: not refused (logged)


def test_a_candidate_that_does_not_fit_is_refused_with_the_numbers(tmp_path: Path) -> None:
    manifest = manifest_of(tmp_path, 400 * MIB)
    with pytest.raises(OtaError) as info:
        check_fits(manifest, lambda: 300 * MIB)
    assert info.value.code == "no_memory"
    needed = (int(400 * MIB * LOAD_FACTOR) + RESERVE_BYTES) // MIB
    message = info.value.message
    assert f"{needed} MiB" in message and "400 MiB of files" in message
    assert "only 300 MiB is available" in message


def test_the_real_bundle_needs_more_than_its_files(default_bundle: Path) -> None:
    """The estimate covers what loading SmolLM2 actually costs (1.21x its files, measured)."""
    manifest = parse_manifest(json.loads((default_bundle / "manifest.json").read_text()))
    files = sum((default_bundle / rel).stat().st_size for rel in manifest.files)
    with pytest.raises(OtaError):
        check_fits(manifest, lambda: int(files * 1.21))
    check_fits(manifest, lambda: int(files * LOAD_FACTOR) + RESERVE_BYTES)


# --- the installer, in this process, with an injected meminfo ---------------------------------


class Recorder:
    """OtaHooks that keep what the installer told the agent."""

    def __init__(self) -> None:
        self.statuses: list[tuple[dict[str, Any], bool]] = []
        self.activated: list[LoadedModel] = []
        self.lock = threading.Lock()

    def hooks(self) -> OtaHooks:
        def publish(payload: dict[str, Any], retain: bool) -> None:
            with self.lock:
                self.statuses.append((payload, retain))

        return OtaHooks(
            publish_status=publish, set_updating=lambda _: None, activate=self.activated.append
        )

    def states(self) -> list[str]:
        return [status["state"] for status, _ in self.statuses]


def installer(state: Path, recorder: Recorder, **kwargs: Any) -> OtaInstaller:
    config = OtaConfig(require_signature=False, trusted_keys_dir=state / "keys")
    guard = ProbationGuard(state, 3, 600.0)
    return OtaInstaller(state, config, RuntimeConfig(), recorder.hooks(), guard, **kwargs)


def test_an_update_that_does_not_fit_ends_no_memory_before_loading(tmp_path: Path) -> None:
    bundle = make_synthetic_bundle(tmp_path / "v2", version="2")  # not a real graph: never loaded
    www = tmp_path / "www"
    www.mkdir()
    packed = pack_bundle(bundle, www / "v2.tar", allow_unsigned=True)
    recorder = Recorder()
    asked: list[str] = []

    def little_memory() -> int:
        asked.append(recorder.states()[-1])  # when the installer asks
        return 64 * MIB

    state = tmp_path / "state"
    ota = installer(state, recorder, read_memory=little_memory)
    with FileServer(www) as server:
        body = {"id": "big", "url": server.url_for("v2.tar"), "sha256": packed.sha256,
                "size": packed.size, "version": "2"}  # fmt: skip
        ota.submit(parse_update_command(json.dumps(body).encode(), 1 << 30))
        ota.wait(60)
    final, retained = recorder.statuses[-1]
    assert retained and final["state"] == "failed", recorder.statuses
    assert final["error"]["code"] == "no_memory"
    assert "only 64 MiB is available" in final["error"]["message"]
    assert asked == ["testing"]  # after every check on the files, before the load
    assert recorder.activated == []
    slots = Slots(state / "bundles")
    assert slots.current() is None and not slots.path("a").exists()
    assert list((state / "ota" / "download").iterdir()) == []


# --- the attempt cap -------------------------------------------------------------------------


def test_the_attempt_count_is_persisted_and_absent_means_none(tmp_path: Path) -> None:
    command = parse_update_command(command_bytes(id="u"), 100)
    store = OtaStore(tmp_path / "state.json", 100)
    store.save(OtaRecord(command, "testing", slot="a", attempts=2))
    loaded = store.load()
    assert loaded is not None and loaded.attempts == 2
    data = json.loads(store.path.read_text())
    del data["attempts"]  # the state file of an agent from before the cap
    store.path.write_text(json.dumps(data))
    loaded = store.load()
    assert loaded is not None and loaded.attempts == 0 and loaded.state == "testing"
    assert "attempts" not in loaded.status_payload()  # DESIGN.md's ota/status is unchanged


@pytest.mark.parametrize("cut_in", ["verifying", "testing", "switching"])
def test_resume_after_the_last_attempt_fails_crash_loop_and_empties_the_slot(
    tmp_path: Path, cut_in: OtaStateName
) -> None:
    state = tmp_path / "state"
    slots = Slots(state / "bundles")
    make_synthetic_bundle(slots.path("b"), version="2")  # the candidate the agent died testing
    command = parse_update_command(command_bytes(id="loop"), 100)
    store = OtaStore(state / "ota" / "state.json", 32 << 30)
    store.save(OtaRecord(command, cut_in, slot="b", attempts=3))
    recorder = Recorder()
    installer(state, recorder).resume()
    assert len(recorder.statuses) == 1, recorder.statuses  # nothing re-entered
    final, retained = recorder.statuses[0]
    assert retained and final["state"] == "failed"
    assert final["error"]["code"] == "crash_loop"
    assert "3 times" in final["error"]["message"]
    assert not slots.path("b").exists() and slots.current() is None
    saved = store.load()
    assert saved is not None and saved.state == "failed"
    assert FinishedLog(state / "ota" / "finished.json").get("loop") == final


HOLDING_IN_TESTING = "EDGE_TEST_OTA_HOLD: holding 90 s in state testing"


def kill_once_testing(agent: AgentProcess, times_before: int, timeout: float = 180) -> None:
    """SIGKILL the agent once its installer is in `testing` (the candidate about to be loaded
    beside the serving model). Observed in the agent's log, which the hold writes once the state
    is persisted and announced. (Not from `ota/status`: what a restarted agent publishes before
    its MQTT connection is up can wait in paho until its next publish, which paho does not
    support; a job's answer is asked for before the final status for the same reason.)"""
    deadline = time.monotonic() + timeout
    while agent.log().count(HOLDING_IN_TESTING) <= times_before:
        assert agent.process.poll() is None, agent.log()[-3000:]
        assert time.monotonic() < deadline, agent.log()[-3000:]
        time.sleep(0.2)
    agent.process.send_signal(signal.SIGKILL)
    agent.process.wait(10)


@pytest.mark.slow
@pytest.mark.session_bundle
def test_a_candidate_that_kills_the_agent_while_testing_ends_crash_loop(
    fleet: Fleet, broker: Broker, probe: MqttProbe
) -> None:
    """Each time the update reaches `testing` (the candidate loaded beside the serving model) the
    agent is SIGKILLed, as a candidate that crashes the process on load would; each restart
    resumes it. After the default 3 attempts the next start ends it `failed`/`crash_loop`, the
    candidate's slot is emptied and version 1 answers jobs."""
    command = fleet.publish(fleet.bundle("2"))
    held = hold_env(testing=90)  # time to observe `testing` and kill the agent there
    agent = start(fleet, broker, probe, env=held)
    device = agent.device
    try:
        update(probe, device, "loop-1", command)
        for attempt in range(3):  # [ota] max_attempts: 3 by default
            kill_once_testing(agent, attempt)
            agent = start_agent(fleet.base, broker, fleet.root / "agent", device=device,
                                config=agent_config(fleet), env=held)  # fmt: skip
        assert answer(probe, device, "after-loop")["engine"]["version"] == "1"
        final = ota_final(probe, device, "loop-1")
        assert final["state"] == "failed", final
        assert final["error"]["code"] == "crash_loop", final
        assert "3 times" in final["error"]["message"]
        bundles = fleet.root / "agent" / "state" / "bundles"
        assert not (bundles / "a").exists() and not (bundles / "b").exists()
        assert not (bundles / "current").exists()
        assert wait_status(probe, device, "online")["engine"]["version"] == "1"
        log = agent.log()
        assert "attempt 3 of 3" in log and "attempt 4" not in log
        update(probe, device, "loop-1", command)  # sent again: said again, not run again
        again = ota_final(probe, device, "loop-1")
        assert again["state"] == "failed" and again["error"]["code"] == "crash_loop"
    finally:
        agent.stop()

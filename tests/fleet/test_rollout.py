"""`rollout`: wave planning and the halting rule (pure), then whole rollouts over a real broker
against scripted devices (test stand-ins for agents; see tests/fleet/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import MqttConfig
from fleet.cli import main
from fleet.rollout import (
    RolloutObserver,
    WavePlan,
    failures_exceed,
    format_summary,
    new_rollout_id,
    parse_max_failures,
    plan_waves,
    rollout,
)
from fleet.update import UpdateCommand, make_command
from tests.conftest import Broker
from tests.fleet.conftest import DeviceFactory

SHA = "cd" * 32
URL = "http://files.example:8000/tiny.tar"
DEVICES = [f"d{i}" for i in range(10)]


def command() -> UpdateCommand:
    """A new update id each time: a device's retained ota/status of an earlier one is ignored."""
    return make_command(new_rollout_id(), URL, SHA, 1234, "2")


@pytest.mark.parametrize(
    ("canary", "growth", "sizes"),
    [
        (1, 2.0, [1, 2, 4, 3]),
        (2, 2.0, [2, 4, 4]),
        (1, 1.0, [1] * 10),
        (1, 1.5, [1, 2, 3, 4]),  # rounded up, so a wave always grows by at least one
        (3, 10.0, [3, 7]),
        (20, 2.0, [10]),
    ],
)
def test_plan_waves(canary: int, growth: float, sizes: list[int]) -> None:
    waves = plan_waves(DEVICES, canary, growth)
    assert [len(w) for w in waves] == sizes
    assert [d for w in waves for d in w] == DEVICES  # every device once, in order


@pytest.mark.parametrize(("canary", "growth"), [(0, 2.0), (1, 0.5)])
def test_plan_waves_refuses_nonsense(canary: int, growth: float) -> None:
    with pytest.raises(ValueError):
        plan_waves(DEVICES, canary, growth)


@pytest.mark.parametrize(
    ("failures", "attempted", "max_failures", "exceeded"),
    [
        (0, 1, 0, False),
        (1, 1, 0, True),
        (2, 7, 2, False),
        (3, 7, 2, True),
        (1, 10, 0.1, False),  # 10% of 10 is tolerated
        (2, 10, 0.1, True),
        (1, 1, 0.5, True),  # a failed canary is 100% of those attempted
        (1, 3, 0.5, False),
        (0, 0, 0.0, False),
    ],
)
def test_failures_exceed(
    failures: int, attempted: int, max_failures: float, exceeded: bool
) -> None:
    assert failures_exceed(failures, attempted, max_failures) is exceeded


def test_parse_max_failures() -> None:
    assert parse_max_failures("3") == 3 and isinstance(parse_max_failures("3"), int)
    assert parse_max_failures("25%") == 0.25
    for bad in ("-1", "150%", "two", "1.5"):
        with pytest.raises(ValueError):
            parse_max_failures(bad)


def test_rollout_completes(mqtt: MqttConfig, scripted_device: DeviceFactory) -> None:
    devices = [scripted_device("ok").device for _ in range(5)]
    waves_seen: list[int] = []
    summary = rollout(
        mqtt, devices, command(), WavePlan(canary=1, growth=2.0, per_device_timeout_s=20),
        RolloutObserver(on_wave=lambda index, waves: waves_seen.append(index)),
    )  # fmt: skip
    assert summary.ok and not summary.halted
    assert [len(w) for w in summary.waves] == [1, 2, 2] and waves_seen == [0, 1, 2]
    assert [r.wave for r in summary.results] == [1, 2, 2, 3, 3]
    assert summary.counts == {"active": 5}
    assert summary.reason == "all 5 devices active"
    assert all(r.seconds is not None for r in summary.results)


def test_rollout_halts_at_its_failure_threshold(
    mqtt: MqttConfig, scripted_device: DeviceFactory
) -> None:
    scripts = ["ok", "ok", "fail", "ok", "ok", "ok", "ok"]
    fleet = [scripted_device(script) for script in scripts]
    summary = rollout(
        mqtt, [d.device for d in fleet], command(),
        WavePlan(canary=1, growth=2.0, max_failures=0, per_device_timeout_s=20),
    )  # fmt: skip
    assert summary.halted and summary.waves_run == 2
    states = [r.state for r in summary.results]
    assert states == ["active", "active", "failed", "skipped", "skipped", "skipped", "skipped"]
    assert summary.results[2].error == "[untrusted] not signed by a trusted key"
    assert all(not d.commands for d in fleet[3:])  # skipped devices were never sent the update
    assert summary.counts == {"active": 2, "failed": 1, "skipped": 4}
    assert "halted after wave 2, 4 devices skipped" in summary.reason
    table = format_summary(summary)
    assert "HALTED" in table and "skipped" in table


def test_rollout_tolerates_failures_within_the_threshold(
    mqtt: MqttConfig, scripted_device: DeviceFactory
) -> None:
    scripts = ["ok", "rollback", "ok", "silent"]  # a silent device times out: a failure
    fleet = [scripted_device(script) for script in scripts]
    summary = rollout(
        mqtt, [d.device for d in fleet], command(),
        WavePlan(canary=1, growth=3.0, max_failures=0.5, per_device_timeout_s=1.5),
    )  # fmt: skip
    assert not summary.halted and not summary.ok
    assert [r.state for r in summary.results] == ["active", "rolled_back", "active", "timeout"]
    assert "completed with 2 failure(s)" in summary.reason


def test_cli_rollout_json_and_exit_status(
    broker: Broker, scripted_device: DeviceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = [scripted_device(script) for script in ("fail", "ok", "ok")]
    argv = [
        "rollout", "--devices", ",".join(d.device for d in fleet), "--url", URL,
        "--sha256", SHA, "--size", "1234", "--version", "2", "--broker", broker.address,
        "--timeout", "20", "--json",
    ]  # fmt: skip
    assert main(argv) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["outcome"] == "halted"
    assert [d["state"] for d in summary["devices"]] == ["failed", "skipped", "skipped"]


def test_cli_rollout_human_output(
    broker: Broker,
    scripted_device: DeviceFactory,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    fleet = [scripted_device("ok") for _ in range(3)]
    devices_file = tmp_path / "fleet.txt"
    devices_file.write_text("# site A\n" + "\n".join(d.device for d in fleet) + "\n\n")
    argv = [
        "rollout", "--devices-file", str(devices_file), "--url", URL, "--sha256", SHA,
        "--size", "1234", "--version", "2", "--broker", broker.address, "--timeout", "20",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wave 1/2 (canary): 1 device(s): {fleet[0].device}" in out
    assert f"  {fleet[0].device} verifying" in out
    assert "completed: all 3 devices active" in out


def test_cli_rollout_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["rollout", "--devices", "a,b,a", "--url", URL, "--sha256", SHA, "--size", "1",
            "--version", "2"]  # fmt: skip
    assert main(argv) == 2
    assert "listed twice: a" in capsys.readouterr().err

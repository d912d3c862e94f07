"""`update`: one command to one device over a real broker, answered by a scripted device
(a test stand-in for an agent; see tests/fleet/conftest.py)."""

from __future__ import annotations

import pytest

from agent.config import MqttConfig
from agent.local_broker import free_port
from fleet.cli import main
from fleet.update import OtaStatus, UpdateError, UpdateTimeout, send_update
from tests.conftest import Broker
from tests.fleet.conftest import DeviceFactory

SHA = "ab" * 32
URL = "http://files.example:8000/tiny.tar"


def test_update_follows_the_device_to_active(
    mqtt: MqttConfig, scripted_device: DeviceFactory
) -> None:
    device = scripted_device("ok")
    seen: list[OtaStatus] = []
    final = send_update(
        mqtt, device.device, URL, SHA, 1234, "2", "upd-1", timeout_s=20, on_status=seen.append
    )
    assert final.state == "active" and final.id == "upd-1" and final.version == "2"
    assert [s.state for s in seen][-3:] == ["verifying", "testing", "active"]
    assert device.commands == [
        {"id": "upd-1", "url": URL, "sha256": SHA, "size": 1234, "version": "2"}
    ]


def test_retained_status_of_an_older_update_is_ignored(
    mqtt: MqttConfig, scripted_device: DeviceFactory
) -> None:
    device = scripted_device("fail")
    device.publish_status(  # what the last update left on the retained topic
        {"id": "upd-old", "state": "active", "version": "1", "progress": 1.0, "error": None}
    )
    seen: list[OtaStatus] = []
    final = send_update(
        mqtt, device.device, URL, SHA, 1234, "2", "upd-new", timeout_s=20, on_status=seen.append
    )
    assert final.state == "failed" and final.error and final.error["code"] == "untrusted"
    assert {s.id for s in seen} == {"upd-new"}


def test_no_final_state_is_a_timeout(mqtt: MqttConfig, scripted_device: DeviceFactory) -> None:
    device = scripted_device("silent")
    with pytest.raises(UpdateTimeout) as info:
        send_update(mqtt, device.device, URL, SHA, 1234, "2", timeout_s=1.0)
    assert info.value.code == "timeout" and info.value.last is None
    assert "ota/status" in info.value.message


def test_bad_arguments_are_refused_before_sending(mqtt: MqttConfig) -> None:
    for kwargs in ({"sha256": "xyz"}, {"url": "ftp://x/y.tar"}, {"size": 0}):
        args = {"url": URL, "sha256": SHA, "size": 10, "version": "2"} | kwargs
        with pytest.raises(UpdateError) as info:
            send_update(mqtt, "dev", timeout_s=1, **args)  # type: ignore[arg-type]
        assert info.value.code == "bad_command"


def test_no_broker(broker: Broker) -> None:
    nowhere = MqttConfig(host="127.0.0.1", port=free_port(), session_expiry_s=0)
    with pytest.raises(UpdateError) as info:
        send_update(nowhere, "dev", URL, SHA, 10, "2", timeout_s=1.0)
    assert info.value.code == "no_broker"


@pytest.mark.parametrize(("script", "code"), [("ok", 0), ("rollback", 1), ("silent", 3)])
def test_cli_update_exit_status(
    broker: Broker,
    scripted_device: DeviceFactory,
    capsys: pytest.CaptureFixture[str],
    script: str,
    code: int,
) -> None:
    device = scripted_device(script)
    argv = [
        "update", "--device", device.device, "--url", URL, "--sha256", SHA, "--size", "1234",
        "--version", "2", "--broker", broker.address, "--timeout", "2",
    ]  # fmt: skip
    assert main(argv) == code
    out = capsys.readouterr().out
    if script == "ok":
        assert f"{device.device} downloading 50%" in out
        assert f"{device.device} active (version 2)" in out
    if script == "rollback":
        assert "rolled_back [probation] crashed 3 times" in out

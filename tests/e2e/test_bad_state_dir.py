"""A state dir the agent cannot write: `edge-agent run` says so in one line and exits 2 (the config
error convention) before it connects or publishes anything, instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Broker, MqttProbe, mounted_tmpfs, unique_device


def run_agent(
    bundle: Path, broker: Broker, device: str, state_dir: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "run", "--bundle", str(bundle),
         "--broker", broker.address, "--device-id", device, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def assert_refused_in_one_line(
    result: subprocess.CompletedProcess[str], state_dir: Path, reason: str
) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edge-agent: error: [bad_state_dir] ")
    assert str(state_dir) in lines[0] and reason in lines[0]


def assert_published_nothing(probe: MqttProbe, device: str) -> None:
    with pytest.raises(AssertionError, match="no message"):
        probe.next(2)  # not even a retained status or a Last Will
    late = MqttProbe(probe.broker)
    try:
        late.subscribe(f"edgellm/{device}/#")
        with pytest.raises(AssertionError, match="no message"):
            late.next(2)
    finally:
        late.close()


def test_state_dir_on_a_read_only_file_system(
    default_bundle: Path, broker: Broker, probe: MqttProbe, tmp_path: Path
) -> None:
    device = unique_device()
    probe.subscribe(f"edgellm/{device}/#")
    with mounted_tmpfs(tmp_path / "ro", "64k", read_only=True) as mount:
        for state_dir in (mount, mount / "state"):  # the dir itself; one to create in it
            result = run_agent(default_bundle, broker, device, state_dir)
            assert_refused_in_one_line(result, state_dir, "Read-only file system")
    assert_published_nothing(probe, device)


def test_state_dir_under_a_regular_file(
    default_bundle: Path, broker: Broker, probe: MqttProbe, tmp_path: Path
) -> None:
    device = unique_device()
    probe.subscribe(f"edgellm/{device}/#")
    (tmp_path / "a-file").write_text("not a directory")
    state_dir = tmp_path / "a-file" / "state"
    result = run_agent(default_bundle, broker, device, state_dir)
    assert_refused_in_one_line(result, state_dir, "Not a directory")
    assert_published_nothing(probe, device)

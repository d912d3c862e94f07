"""The systemd units: systemd-analyze verify and security, the user and directories they create
(systemd-sysusers and systemd-tmpfiles run into a scratch root), and the settings the agent
relies on (notify, watchdog, stop timeout, GPU devices)."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "edge-agent.service"
SYSUSERS = REPO / "systemd" / "edge-agent.sysusers"
TMPFILES = REPO / "systemd" / "edge-agent.tmpfiles"
EXPOSURE_LIMIT = 2.5
# What systemd-analyze prints when it cannot work inside this container, not about the unit.
ENVIRONMENT_PROBLEMS = ("Failed to initialize", "Failed to connect to bus", "Unit sysinit.target")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install systemd)")
    return path


def directives(unit: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value, in order (systemd allows a key many times)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    # verify checks that ExecStart's program exists; /opt/edge-agent is only there on a device,
    # so check a copy that runs this checkout's edge-agent and is otherwise the same unit.
    program = Path(shutil.which("edge-agent") or REPO / ".venv" / "bin" / "edge-agent")
    if not program.exists():
        pytest.skip("no edge-agent executable to stand in for /opt/edge-agent/venv/bin/edge-agent")
    text = UNIT.read_text()
    assert "ExecStart=/opt/edge-agent/venv/bin/edge-agent run" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/opt/edge-agent/venv/bin/edge-agent", str(program)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and any(p in output for p in ENVIRONMENT_PROBLEMS):
        pytest.skip(f"systemd-analyze verify cannot run in this container: {output}")
    assert result.returncode == 0, output
    assert output == "", output  # no "Unknown key", no "ignoring": every line is understood


def test_security_exposure(capsys: pytest.CaptureFixture[str]) -> None:
    analyze = tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", output)
    if match is None and "--offline" in output:
        pytest.skip(f"this systemd-analyze has no offline security review: {output.strip()}")
    assert match is not None, output
    score = float(match.group(1))
    with capsys.disabled():
        print(f"\nsystemd-analyze security: {score} {match.group(2)}")
    assert score <= EXPOSURE_LIMIT, output


def test_notify_watchdog_restart_and_stop_settings() -> None:
    unit = directives(UNIT)
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.ExecStart"] == [
        "/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml"
    ]
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.WatchdogSec"] == ["120s"]
    assert unit["Unit.StartLimitIntervalSec"] and unit["Unit.StartLimitBurst"]
    # The OTA probation guard must be able to see its 3 crashes before systemd gives up.
    assert int(unit["Unit.StartLimitBurst"][0]) > 3
    from agent.service import AgentService

    grace = inspect.signature(AgentService.shutdown).parameters["grace_s"].default
    stop_timeout = int(unit["Service.TimeoutStopSec"][0].removesuffix("s"))
    # grace for the running job, then 10 s after cancelling it, 5 s to publish `offline`.
    assert stop_timeout > grace + 10 + 5
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_user_and_hardening() -> None:
    unit = directives(UNIT)
    assert unit["Service.User"] == ["edge-agent"] and unit["Service.Group"] == ["edge-agent"]
    assert unit["Service.CapabilityBoundingSet"] == [""]
    for key, value in {
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/edge-agent",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "DevicePolicy": "closed",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert unit[f"Service.{key}"] == [value], key
    assert "Service.PrivateDevices" not in unit  # would hide the GPU
    allowed = {entry.split()[0] for entry in unit["Service.DeviceAllow"]}
    assert {
        "/dev/nvmap",
        "/dev/host1x-fence",
        "/dev/nvhost-ctrl-gpu",
        "/dev/nvhost-gpu",
        "/dev/nvgpu/igpu0/ctrl",
        "/dev/nvgpu/igpu0/channel",
        "/dev/dri/renderD128",
        "char-nvidia-frontend",
        "char-nvidia-uvm",
    } <= allowed
    assert all(entry.split()[1] == "rw" for entry in unit["Service.DeviceAllow"])  # never mknod


def test_sysusers_and_tmpfiles_in_a_scratch_root(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    tmpfiles = tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], check=True, capture_output=True)
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }
    user = passwd["edge-agent"]
    assert user[5] == "/var/lib/edge-agent" and user[6] == "/usr/sbin/nologin"
    for group in ("video", "render"):
        assert "edge-agent" in groups[group][3].split(","), group
    uid, gid = int(user[2]), int(user[3])

    config = root / "etc/edge-agent/agent.toml"
    key = root / "etc/edge-agent/tls/device.key"
    key.parent.mkdir(parents=True)
    config.write_text("[device]\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    config.chmod(0o666)
    key.chmod(0o644)
    subprocess.run(
        [tmpfiles, f"--root={root}", "--create", str(TMPFILES)], check=True, capture_output=True
    )

    def mode(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return oct(st.st_mode & 0o7777), st.st_uid, st.st_gid

    assert mode(root / "var/lib/edge-agent") == ("0o750", uid, gid)
    assert mode(root / "etc/edge-agent") == ("0o750", 0, gid)
    assert mode(config) == ("0o640", 0, gid)
    assert mode(key) == ("0o600", uid, gid)  # repaired
    assert mode(root / "etc/edge-agent/trusted_keys") == ("0o755", 0, 0)

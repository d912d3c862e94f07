"""jetson/provision.sh against a scratch rootfs folder (real certificates and keys made with
openssl), jetson/setup.sh's plan (--dry-run), and shellcheck on both scripts."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROVISION = REPO / "jetson" / "provision.sh"
SETUP = REPO / "jetson" / "setup.sh"
SCRIPTS = sorted((REPO / "jetson").glob("*.sh"))  # every script there, for shellcheck

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="provision.sh sets file owners in the rootfs: needs root"
)
needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is not installed (makes the test's PKI)"
)


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    trusted: Path
    other_cert: Path  # signed by another CA
    fleet_private: Path


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", d / f"{ca}.key", "-out", d / f"{ca}.pem",
                "-subj", f"/CN={ca}", "-days", "30")  # fmt: skip
    openssl("req", *ec, "-keyout", d / "dev.key", "-out", d / "dev.csr", "-subj", "/CN=orin-01")
    for ca, out in (("ca", "dev.pem"), ("other-ca", "other.pem")):
        ca_files = ("-CA", d / f"{ca}.pem", "-CAkey", d / f"{ca}.key", "-CAcreateserial")
        openssl("x509", "-req", "-in", d / "dev.csr", *ca_files, "-out", d / out, "-days", "30")
    openssl("genpkey", "-algorithm", "ed25519", "-out", d / "fleet.key")
    openssl("pkey", "-in", d / "fleet.key", "-pubout", "-out", d / "fleet-2026.pub")
    return Pki(
        d / "ca.pem", d / "dev.pem", d / "dev.key", d / "fleet-2026.pub", d / "other.pem",
        d / "fleet.key",
    )  # fmt: skip


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """The parts of a Linux_for_Tegra/rootfs that provisioning touches."""
    root = tmp_path / "Linux_for_Tegra" / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\n"
        "systemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin\n"
        "nvidia:x:1000:1000::/home/nvidia:/bin/bash\n"
    )
    (root / "etc/group").write_text(
        "root:x:0:\nvideo:x:44:nvidia\nrender:x:109:\nsystemd-network:x:998:\nnvidia:x:1000:\n"
    )
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\nnvidia:!:19000::::::\n")
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/gshadow").write_text("root:*::\nvideo:*::nvidia\nrender:*::\nnvidia:!::\n")
    return root


def provision(
    rootfs: Path | str, pki: Pki, *extra: str, **overrides: str
) -> subprocess.CompletedProcess[str]:
    flags = {
        "--device-id": "orin-01",
        "--broker": "mqtt.site.local:8883",
        "--ca": str(pki.ca),
        "--cert": str(pki.cert),
        "--key": str(pki.key),
        "--trusted-key": str(pki.trusted),
    }
    for flag, value in overrides.items():
        flags[f"--{flag.replace('_', '-')}"] = value
    argv = [str(PROVISION), str(rootfs)]
    for flag, value in flags.items():
        if value != "":
            argv += [flag, value]
    return subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=60)


def passwd_entry(rootfs: Path, name: str) -> list[str]:
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        if line.split(":")[0] == name:
            return line.split(":")
    raise AssertionError(f"{name} not in {rootfs}/etc/passwd")


def group_members(rootfs: Path, name: str, file: str = "group") -> list[str]:
    for line in (rootfs / "etc" / file).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return [m for m in fields[3].split(",") if m]
    raise AssertionError(f"{name} not in {file}")


def tree(root: Path) -> list[tuple[str, ...]]:
    """Everything about the rootfs that provisioning could change: paths, modes, owners, bytes."""
    entries: list[tuple[str, ...]] = []
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        detail = (
            os.readlink(path)
            if path.is_symlink()
            else hashlib.sha256(path.read_bytes()).hexdigest()
            if path.is_file()
            else "dir"
        )
        entries.append(
            (str(path.relative_to(root)), oct(st.st_mode), str(st.st_uid), str(st.st_gid), detail)
        )
    return entries


def mode_owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_mode & 0o7777, st.st_uid, st.st_gid


# --- the scripts themselves --------------------------------------------------------------------


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {PROVISION, SETUP} <= set(SCRIPTS)


@pytest.mark.parametrize("script", [PROVISION, SETUP], ids=lambda p: p.name)
def test_help_and_strict_mode(script: Path) -> None:
    assert "set -euo pipefail" in script.read_text()
    assert os.access(script, os.X_OK)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage:" in result.stdout


# --- provisioning ---------------------------------------------------------------------------------


@needs_root
@needs_openssl
def test_provision_writes_identity_config_keys_and_enables_the_unit(rootfs: Path, pki: Pki) -> None:
    result = provision(rootfs, pki)
    assert result.returncode == 0, result.stderr

    user = passwd_entry(rootfs, "edge-agent")
    uid, gid = int(user[2]), int(user[3])
    assert 100 <= uid <= 999 and uid not in (0, 998, 1000)  # a free system id in the rootfs
    assert user[5:] == ["/var/lib/edge-agent", "/usr/sbin/nologin"]
    assert "edge-agent" in group_members(rootfs, "video")
    assert "nvidia" in group_members(rootfs, "video")  # existing members kept
    assert "edge-agent" in group_members(rootfs, "render")
    assert "edge-agent" in group_members(rootfs, "video", "gshadow")
    assert any(
        line.startswith("edge-agent:!") for line in (rootfs / "etc/shadow").read_text().splitlines()
    )
    assert mode_owner(rootfs / "etc/shadow")[0] == 0o640  # edited in place, mode kept

    etc = rootfs / "etc/edge-agent"
    assert mode_owner(etc) == (0o750, 0, gid)
    assert mode_owner(etc / "tls") == (0o750, 0, gid)
    assert mode_owner(etc / "tls/device.key") == (0o600, uid, gid)
    assert (etc / "tls/device.key").read_bytes() == pki.key.read_bytes()
    assert mode_owner(etc / "tls/device.pem") == (0o644, 0, 0)
    assert (etc / "tls/ca.pem").read_bytes() == pki.ca.read_bytes()
    assert mode_owner(etc / "trusted_keys") == (0o755, 0, 0)
    assert [p.name for p in (etc / "trusted_keys").iterdir()] == ["fleet-2026.pub"]
    assert mode_owner(etc / "trusted_keys/fleet-2026.pub") == (0o644, 0, 0)
    assert mode_owner(rootfs / "var/lib/edge-agent") == (0o750, uid, gid)

    assert mode_owner(etc / "agent.toml") == (0o640, 0, gid)
    config = tomllib.loads((etc / "agent.toml").read_text())
    assert config["device"] == {"id": "orin-01"}
    assert config["mqtt"] == {
        "host": "mqtt.site.local",
        "port": 8883,
        "prefix": "edgellm",
        "ca_file": "/etc/edge-agent/tls/ca.pem",
        "cert_file": "/etc/edge-agent/tls/device.pem",
        "key_file": "/etc/edge-agent/tls/device.key",
        "reply_topics": ["{prefix}/{device}/results/#"],
    }
    assert config["ota"] == {"trusted_keys_dir": "/etc/edge-agent/trusted_keys"}
    assert config["bundle"] == {"path": "/var/lib/edge-agent/bundles/current"}
    assert config["state"] == {"dir": "/var/lib/edge-agent"}

    unit = rootfs / "lib/systemd/system/edge-agent.service"
    assert unit.read_text() == (REPO / "systemd/edge-agent.service").read_text()
    link = rootfs / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
    assert os.readlink(link) == "/lib/systemd/system/edge-agent.service"
    assert (rootfs / "lib/sysusers.d/edge-agent.conf").is_file()
    assert (rootfs / "lib/tmpfiles.d/edge-agent.conf").is_file()


@needs_root
@needs_openssl
def test_running_twice_changes_nothing(rootfs: Path, pki: Pki) -> None:
    assert provision(rootfs, pki).returncode == 0
    first = tree(rootfs)
    second_run = provision(rootfs, pki)
    assert second_run.returncode == 0, second_run.stderr
    assert "created" not in second_run.stdout
    assert tree(rootfs) == first


@needs_root
@needs_openssl
def test_an_existing_user_keeps_its_uid_and_keys_are_exactly_those_given(
    rootfs: Path, pki: Pki, tmp_path: Path
) -> None:
    with (rootfs / "etc/passwd").open("a") as f:
        f.write("edge-agent:x:321:321:Edge LLM agent:/var/lib/edge-agent:/usr/sbin/nologin\n")
    with (rootfs / "etc/group").open("a") as f:
        f.write("edge-agent:x:321:\n")
    stale = rootfs / "etc/edge-agent/trusted_keys/retired.pub"
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    assert provision(rootfs, pki).returncode == 0
    assert mode_owner(rootfs / "etc/edge-agent/tls/device.key") == (0o600, 321, 321)
    assert not stale.exists()
    assert passwd_entry(rootfs, "edge-agent")[2] == "321"


@needs_root
@needs_openssl
def test_merged_usr_rootfs_and_a_first_bundle(rootfs: Path, pki: Pki, tmp_path: Path) -> None:
    (rootfs / "usr/lib/systemd/system").mkdir(parents=True)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"format": 1}')
    (bundle / "model.onnx").write_bytes(b"onnx")
    result = provision(rootfs, pki, "--bundle", str(bundle))
    assert result.returncode == 0, result.stderr
    link = rootfs / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
    assert os.readlink(link) == "/usr/lib/systemd/system/edge-agent.service"
    bundles = rootfs / "var/lib/edge-agent/bundles"
    assert os.readlink(bundles / "current") == "a"
    assert (bundles / "a/model.onnx").read_bytes() == b"onnx"
    uid = int(passwd_entry(rootfs, "edge-agent")[2])
    assert (bundles / "a/manifest.json").stat().st_uid == uid


# --- refusals, each with a message that says what is wrong ----------------------------------


@needs_openssl
def test_refuses_a_missing_rootfs(tmp_path: Path, pki: Pki) -> None:
    result = provision(tmp_path / "nope", pki)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and str(tmp_path / "nope") in result.stderr


@needs_openssl
def test_refuses_a_folder_that_is_not_a_rootfs(tmp_path: Path, pki: Pki) -> None:
    result = provision(tmp_path, pki)
    assert result.returncode == 2 and "does not look like a Jetson Linux rootfs" in result.stderr


@needs_openssl
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"device_id": ""}, "--device-id is required"),
        ({"device_id": "bad id!"}, "use 1-128 characters"),
        ({"broker": ""}, "--broker HOST:PORT is required"),
        ({"broker": "mqtt.site"}, "must be HOST:PORT"),
        ({"broker": "mqtt.site:99999"}, "must be HOST:PORT"),
        ({"ca": ""}, "--ca FILE is required"),
        ({"ca": "/nonexistent/ca.pem"}, "does not exist"),
        ({"key": ""}, "--key FILE is required"),
        ({"trusted_key": ""}, "--trusted-key KEY.pub is required"),
    ],
)
def test_refuses_missing_or_bad_flags(
    rootfs: Path, pki: Pki, override: dict[str, str], message: str
) -> None:
    result = provision(rootfs, pki, **override)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert not (rootfs / "etc/edge-agent").exists()  # nothing written


@needs_root
@needs_openssl
@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("cert_from_other_ca", "is not signed by --ca"),
        ("private_as_trusted", "is a PRIVATE key"),
        ("key_of_other_cert", "does not belong to --cert"),
    ],
)
def test_refuses_pki_mistakes(
    rootfs: Path, pki: Pki, tmp_path: Path, field: str, message: str
) -> None:
    if field == "cert_from_other_ca":
        result = provision(rootfs, pki, cert=str(pki.other_cert))
    elif field == "private_as_trusted":
        result = provision(rootfs, pki, trusted_key=str(pki.fleet_private))
    else:
        other_key = tmp_path / "other.key"
        openssl("genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", other_key)  # fmt: skip
        result = provision(rootfs, pki, key=str(other_key))
    assert result.returncode == 2 and message in result.stderr
    assert not (rootfs / "etc/edge-agent").exists()


@needs_root
@needs_openssl
def test_refuses_to_write_through_a_symlink_out_of_the_rootfs(
    rootfs: Path, pki: Pki, tmp_path: Path
) -> None:
    outside = tmp_path / "host-etc-edge-agent"
    outside.mkdir()
    (rootfs / "etc/edge-agent").symlink_to(outside)  # an absolute link, as on a live system
    result = provision(rootfs, pki)
    assert result.returncode == 2 and "outside the rootfs" in result.stderr
    assert list(outside.iterdir()) == []


# --- setup.sh's plan ------------------------------------------------------------------------


def test_setup_plan_on_a_jetson(tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text(
        "# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64\n"
    )
    wheel = tmp_path / "edge_llm-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    result = subprocess.run(
        [str(SETUP), "--dry-run", "--wheel", str(wheel), "--power-mode", "0", "--max-clocks"],
        capture_output=True,
        text=True,
        env={**os.environ, "TEGRA_RELEASE": str(release)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    assert "python3-libnvinfer" in plan
    assert "-m venv --system-site-packages /opt/edge-agent/venv" in plan
    assert f"pip install --quiet --upgrade {wheel}\\[jetson\\]" in plan
    assert "systemd-sysusers /usr/lib/sysusers.d/edge-agent.conf" in plan
    assert "/usr/lib/systemd/system/edge-agent.service" in plan
    assert "systemctl enable edge-agent.service" in plan
    assert "+ nvpmodel -m 0" in plan and "+ jetson_clocks" in plan


def test_setup_refuses_power_settings_off_a_jetson(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SETUP), "--dry-run", "--source", str(REPO), "--power-mode", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "TEGRA_RELEASE": str(tmp_path / "absent")},
    )
    assert result.returncode == 2 and "need a Jetson" in result.stderr
    missing = subprocess.run([str(SETUP), "--dry-run"], capture_output=True, text=True)
    assert missing.returncode == 2 and "--wheel FILE or --source DIR" in missing.stderr

"""Every section of agent.toml is checked against its type hints: a wrong type, an unknown key or
an unknown section is a one-line `bad_config` naming `section.key`, the expected type and the
value (through `load_config`, and once through a real `edge-agent` process: exit 2); the configs
the project ships (the README's example, jetson/provision.sh's template) stay valid."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from agent.config import ConfigFile, load_config, read_config_file
from agent.errors import ConfigError
from agent.state_dir import StateDir

REPO = Path(__file__).resolve().parents[2]

# One wrong type and one unknown key per section: (TOML line, message expected).
BAD_TYPES = {
    "device": ("id = 3", "device.id must be a string, got 3"),
    "bundle": ("path = 3", "bundle.path must be a path (a string), got 3"),
    "state": ('dir = ["/var/lib"]', "state.dir must be a path (a string), got ['/var/lib']"),
    "mqtt": ('port = "1883"', "mqtt.port must be an integer, got '1883'"),
    "jobs": ("max_batch = 2.5", "jobs.max_batch must be an integer, got 2.5"),
    "runtime": ("threads = true", "runtime.threads must be an integer, got True"),
    "ota": ('enabled = "yes"', "ota.enabled must be true or false, got 'yes'"),
    "telemetry": ('interval_s = "10s"', "telemetry.interval_s must be a number, got '10s'"),
}
UNKNOWN_KEYS = {
    "device": 'name = "orin-01"',
    "bundle": 'dir = "/var/lib/edge-agent/bundles/current"',  # the key is `path`
    "state": 'path = "/var/lib/edge-agent"',  # the key is `dir`
    "mqtt": 'hostname = "broker"',
    "jobs": "batch = 4",
    "runtime": 'device = "cuda"',
    "ota": "max_bundle_size = 10",
    "telemetry": "interval = 5",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.code == "bad_config"
    assert "\n" not in raised.value.message  # one line
    return raised.value.message


def test_the_cases_cover_every_section() -> None:
    sections = {f.name for f in fields(ConfigFile)}
    assert set(BAD_TYPES) == sections and set(UNKNOWN_KEYS) == sections


@pytest.mark.parametrize("section", sorted(BAD_TYPES))
def test_a_wrong_type_names_the_key_the_type_and_the_value(tmp_path: Path, section: str) -> None:
    line, message = BAD_TYPES[section]
    assert refusal(write(tmp_path, f"[{section}]\n{line}\n")) == message


@pytest.mark.parametrize("section", sorted(UNKNOWN_KEYS))
def test_an_unknown_key_is_refused(tmp_path: Path, section: str) -> None:
    line = UNKNOWN_KEYS[section]
    key, value = (part.strip() for part in line.split("=", 1))
    message = refusal(write(tmp_path, f"[{section}]\n{line}\n"))
    assert f"unknown key(s) {section}.{key} = " in message
    assert value.strip('"') in message
    assert "known: " in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device = 3\n", "[device] must be a table, got device = 3"),
        ("[agent]\nid = 1\n", "unknown section(s) [agent]"),
        ("[mqtt]\nport = true\n", "mqtt.port must be an integer, got True"),
        ('[mqtt]\nreply_topics = "#"\n', "mqtt.reply_topics must be a list of strings, got '#'"),
        ("[mqtt.tls]\nca = 1\n", "unknown key(s) mqtt.tls = {'ca': 1}"),
        ("[ota]\nmax_bundle_bytes = 1.5\n", "ota.max_bundle_bytes must be an integer, got 1.5"),
    ],
)
def test_other_refusals(tmp_path: Path, text: str, message: str) -> None:
    assert message in refusal(write(tmp_path, text))


def test_the_file_only_sections_are_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            f'[device]\nid = "orin-07"\n[bundle]\npath = "{tmp_path}/b"\n'
            f'[state]\ndir = "{tmp_path}/s"\n',
        )
    )
    assert config.device_id == "orin-07"
    assert config.bundle == tmp_path / "b"
    assert config.state_dir == tmp_path / "s"
    assert config.state.journal == tmp_path / "s" / "journal.sqlite3"


def test_integers_are_numbers_and_lists_are_tuples(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[ota]\nprobation_window_s = 60\n[mqtt]\nreply_topics = ["a/#"]\n')
    )
    assert config.ota.probation_window_s == 60.0 and isinstance(
        config.ota.probation_window_s, float
    )
    assert config.mqtt.reply_topics == ("a/#",)
    assert config.ota.trusted_keys_dir == Path("/etc/edge-agent/trusted_keys")  # a default


def test_the_readmes_example_config_is_valid(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "[device]" in b)
    config = load_config(write(tmp_path, example))
    assert config.device_id == "orin-01" and config.jobs.prefill_chunk == 256


def test_provisions_config_template_is_valid() -> None:
    script = (REPO / "jetson/provision.sh").read_text(encoding="utf-8")
    template = re.search(r'cat >"\$CONFIG_TMP" <<EOF\n(.*?)\nEOF\n', script, flags=re.S)
    assert template is not None
    values = {
        "DEVICE_ID": "orin-01",
        "STATE_DIR": "/var/lib/edge-agent",
        "CONFIG_DIR": "/etc/edge-agent",
        "BROKER_HOST": "mqtt.site.local",
        "BROKER_PORT": "8883",
        "PREFIX": "edgellm",
        "TELEMETRY_INTERVAL": "10",
    }
    text = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], template.group(1))
    file = read_config_file(tomllib.loads(text), "provision.sh's agent.toml")
    assert file.device.id == "orin-01" and file.mqtt.port == 8883
    assert file.telemetry.interval_s == 10.0
    assert file.state.dir == Path("/var/lib/edge-agent")


def test_edge_agent_exits_2_with_one_line(tmp_path: Path) -> None:
    config = write(tmp_path, '[mqtt]\nport = "1883"\n')
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(config),
         "--bundle", str(tmp_path / "no-bundle"), "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr
        == "edge-agent: error: [bad_config] mqtt.port must be an integer, got '1883'\n"
    )
    assert result.stdout == ""
    assert not (tmp_path / "state").exists()  # refused before anything started


def test_the_state_dir_layout(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert state.journal == tmp_path / "journal.sqlite3"
    assert state.bundles == tmp_path / "bundles"
    assert StateDir.of_bundles(state.bundles) == state
    layout = {
        state.ota_state: "ota/state.json",
        state.ota_finished: "ota/finished.json",
        state.slot_marks: "ota/slots.json",
        state.high_water: "ota/high_water.json",
        state.probation: "ota/probation.json",
        state.downloads: "ota/download",
        state.running_marker: "agent.running",
    }
    assert {path: str(path.relative_to(tmp_path)) for path in layout} == layout
    fresh = tmp_path / "new" / "state"
    StateDir(fresh).check_writable()  # creates it
    assert fresh.is_dir() and list(fresh.iterdir()) == []  # the probe is gone
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as raised:
        StateDir(blocker / "state").check_writable()
    assert raised.value.code == "bad_state_dir" and str(blocker / "state") in raised.value.message

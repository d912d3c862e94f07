"""The agent's TOML configuration: the TLS files and the Response Topic allow-list are checked at
start with a message that names the key, and the allow-list decides which reply topics a job may
name."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.topics import Topics, is_valid_topic_filter


def config_file(tmp_path: Path, mqtt: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[device]\nid = "orin-01"\n[mqtt]\n{mqtt}\n')
    return path


def test_tls_files_and_reply_topics_are_read(tmp_path: Path) -> None:
    for name in ("ca.pem", "device.pem", "device.key"):
        (tmp_path / name).write_text("PEM")
    config = load_config(
        config_file(
            tmp_path,
            f'ca_file = "{tmp_path}/ca.pem"\ncert_file = "{tmp_path}/device.pem"\n'
            f'key_file = "{tmp_path}/device.key"\n'
            'reply_topics = ["{prefix}/{device}/results/#", "ops/+/inbox"]',
        )
    )
    assert config.mqtt.ca_file == f"{tmp_path}/ca.pem"
    assert config.mqtt.reply_topics == ("{prefix}/{device}/results/#", "ops/+/inbox")


@pytest.mark.parametrize(
    ("mqtt", "message"),
    [
        ('ca_file = "/nonexistent/ca.pem"', "mqtt.ca_file /nonexistent/ca.pem is not a file"),
        ('cert_file = "{d}/device.pem"', "mqtt.cert_file and mqtt.key_file go together"),
        ('reply_topics = ["a/#/b"]', "'a/#/b' is not an MQTT topic filter"),
        ('reply_topics = ["x/{site}/results"]', "placeholders: {prefix}, {device}"),
        ('reply_topics = ["ok/#", 3]', "reply_topics must be a list of strings"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, mqtt: str, message: str) -> None:
    (tmp_path / "device.pem").write_text("PEM")
    path = config_file(tmp_path, mqtt.replace("{d}", str(tmp_path)))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.code == "bad_config"
    assert message in raised.value.message


def test_prefill_chunk_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[jobs]\nprefill_chunk = 64\n")
    assert load_config(path).jobs.prefill_chunk == 64
    path.write_text("[jobs]\nprefill_chunk = -1\n")
    with pytest.raises(ConfigError, match=r"jobs\.prefill_chunk must be >= 0"):
        load_config(path)


def test_reply_topics_allow_only_their_space() -> None:
    topics = Topics("edgellm", "orin-01", ("{prefix}/{device}/results/#", "ops/+/inbox"))
    assert topics.allowed_replies == ["edgellm/orin-01/results/#", "ops/+/inbox"]
    assert topics.reply_allowed("edgellm/orin-01/results/job-1")
    assert topics.reply_allowed("edgellm/orin-01/results/a/b/c")
    assert topics.reply_allowed("ops/alice/inbox")
    assert not topics.reply_allowed("edgellm/orin-02/results/job-1")
    assert not topics.reply_allowed("edgellm/orin-01/jobs")
    assert not topics.reply_allowed("ops/alice/inbox/more")
    assert not topics.reply_allowed("edgellm/orin-01/results/+")  # wildcards never publishable


def test_the_default_honours_any_publishable_response_topic() -> None:
    topics = Topics("edgellm", "orin-01")
    assert topics.reply_allowed("clients/abc/replies")
    assert not topics.reply_allowed("$SYS/broker/x")
    assert not topics.reply_allowed("")


@pytest.mark.parametrize(
    ("pattern", "valid"),
    [("#", True), ("a/+/c", True), ("a/#", True), ("a/b#", False), ("a/#/c", False),
     ("a+/b", False), ("", False)],
)  # fmt: skip
def test_topic_filter_syntax(pattern: str, valid: bool) -> None:
    assert is_valid_topic_filter(pattern) is valid


def test_the_fleet_tool_hears_its_own_flag_names(capsys: pytest.CaptureFixture[str]) -> None:
    from fleet.cli import main

    assert main(["prompt", "hi", "--fleet", "--ca", "/nonexistent/ca.pem"]) == 2
    assert "[bad_command] --ca /nonexistent/ca.pem is not a file" in capsys.readouterr().err

"""Agent configuration: a TOML file, flag overrides, and a sane default for every key.

`edge-agent run --bundle DIR` alone works against a broker on localhost:1883 (DESIGN.md).
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agent.batching import PREFILL_CHUNK
from agent.errors import ConfigError
from agent.jobs import JOB_ID_RE
from agent.telemetry.config import TelemetryConfig, validate_telemetry
from agent.topics import is_valid_topic_filter


@dataclass(frozen=True)
class MqttConfig:
    host: str = "localhost"
    port: int = 1883
    prefix: str = "edgellm"
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = None
    # Keep the broker-side session (subscriptions, QoS 1 jobs queued while we were away) this long.
    session_expiry_s: int = 3600
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    # TLS: a CA to trust the broker by, and this device's client certificate (mutual TLS).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Topic filters a job's MQTT v5 Response Topic must match ({prefix} and {device} are filled
    # in); other Response Topics are refused with invalid_request on the job's own results topic.
    # The default honours any Response Topic (DESIGN.md's contract; clients pick their inbox)
    # except, whatever this says, `$`-topics and every device's command and report topics under
    # the prefix (P/+/jobs, P/+/jobs/cancel, P/+/ota, P/+/status, P/+/telemetry, P/+/ota/status:
    # agent/topics.py RESERVED_LEVELS), so a job cannot make a device command itself or another
    # device, or spoof a status. A fleet behind deploy/mosquitto sets
    # ["{prefix}/{device}/results/#"] (provision.sh does),
    # the only space its ACL lets a device write: a forged Response Topic is then refused by the
    # agent with a reason, not just dropped by the broker, and a broker with a looser ACL cannot
    # be used to make a device publish into another device's job queue.
    reply_topics: tuple[str, ...] = ("#",)


@dataclass(frozen=True)
class JobsConfig:
    queue_size: int = 32
    max_batch: int = 8  # jobs decoded together (continuous batching)
    # Prompt tokens prefilled per step while other jobs decode (0 = every prompt whole): a long
    # prompt then delays the running jobs' next token by one chunk, not by its whole prefill.
    prefill_chunk: int = PREFILL_CHUNK
    default_max_tokens: int = 256
    max_tokens_limit: int = 2048
    max_payload_bytes: int = 256 * 1024
    results_kept: int = 1024  # answered jobs remembered so a repeated id gets the stored answer
    retention_s: float = 86400.0  # how long the journal keeps answered jobs


@dataclass(frozen=True)
class RuntimeConfig:
    backend: str = "auto"  # "auto" (the bundle decides) | "onnxruntime" | "tensorrt"
    threads: int = 0  # 0 = ONNX Runtime's default (one per physical core)
    max_seq_len: int = 0  # 0 = the bundle's own context length


@dataclass(frozen=True)
class OtaConfig:
    enabled: bool = True
    trusted_keys_dir: Path = Path("/etc/edge-agent/trusted_keys")
    require_signature: bool = True
    max_bundle_bytes: int = 32 << 30
    # Probation after a switch: this many abnormal exits within the window roll back by themselves.
    probation_crashes: int = 3
    probation_window_s: float = 600.0
    # A download must finish within this many seconds (all retries included) ...
    download_deadline_s: float = 3600.0
    # ... and receive at least this many bytes per second over every window of
    # `download_rate_window_s` (0 = no minimum): a server that trickles is cut off, not waited on.
    download_min_rate_bps: float = 1024.0
    download_rate_window_s: float = 60.0
    # Redirects from the update URL: "same-origin" (scheme, host and port unchanged; the
    # default), "any", or "none".
    follow_redirects: str = "same-origin"

    def __post_init__(self) -> None:
        if self.follow_redirects not in ("same-origin", "any", "none"):
            raise ConfigError(
                "bad_config",
                f'[ota] follow_redirects {self.follow_redirects!r}: use "same-origin", "any" '
                'or "none"',
            )
        if self.download_deadline_s <= 0 or self.download_rate_window_s <= 0:
            raise ConfigError(
                "bad_config", "[ota] download_deadline_s and download_rate_window_s must be > 0"
            )
        if self.download_min_rate_bps < 0:
            raise ConfigError("bad_config", "[ota] download_min_rate_bps must be >= 0 (0 = off)")


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = field(default_factory=lambda: _default_device_id())
    bundle: Path | None = None
    state_dir: Path = field(default_factory=lambda: _default_state_dir())
    mqtt: MqttConfig = MqttConfig()
    jobs: JobsConfig = JobsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    ota: OtaConfig = OtaConfig()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


def _default_device_id() -> str:
    name = socket.gethostname().split(".")[0]
    return name if JOB_ID_RE.match(name) else "edge-device"


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/edge-agent")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "edge-agent"


def _section(cls: type[Any], raw: Any, name: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError("bad_config", f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError("bad_config", f"[{name}]: unknown key(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    defaults = cls()
    for key, value in raw.items():
        expected = type(getattr(defaults, key))
        if getattr(defaults, key) is None:
            expected = str
        if isinstance(getattr(defaults, key), Path) and isinstance(value, str):
            value = Path(value)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = tuple(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            kind = "a list of strings" if expected is tuple else expected.__name__
            raise ConfigError("bad_config", f"[{name}] {key} must be {kind}, got {value!r}")
        values[key] = value
    return cls(**values)


def load_config(path: Path | None) -> AgentConfig:
    """Read a TOML config file (or none: all defaults)."""
    if path is None:
        return AgentConfig()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("bad_config", f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("bad_config", f"{path} is not valid TOML: {exc}") from exc
    sections = {"device", "bundle", "state", "mqtt", "jobs", "runtime", "ota", "telemetry"}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError("bad_config", f"{path}: unknown section(s) {', '.join(unknown)}")
    config = AgentConfig(
        mqtt=_section(MqttConfig, raw.get("mqtt"), "mqtt"),
        jobs=_section(JobsConfig, raw.get("jobs"), "jobs"),
        runtime=_section(RuntimeConfig, raw.get("runtime"), "runtime"),
        ota=_section(OtaConfig, raw.get("ota"), "ota"),
        telemetry=_section(TelemetryConfig, raw.get("telemetry"), "telemetry"),
    )
    device = raw.get("device", {})
    if "id" in device:
        config = replace(config, device_id=str(device["id"]))
    if "path" in raw.get("bundle", {}):
        config = replace(config, bundle=Path(raw["bundle"]["path"]))
    if "dir" in raw.get("state", {}):
        config = replace(config, state_dir=Path(raw["state"]["dir"]))
    return validate(config)


def with_overrides(
    config: AgentConfig,
    *,
    broker: str | None = None,
    device_id: str | None = None,
    bundle: Path | None = None,
    state_dir: Path | None = None,
) -> AgentConfig:
    """Apply command-line flags on top of the file's values."""
    if broker:
        host, _, port = broker.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("bad_config", f"--broker must be HOST:PORT, got {broker!r}")
        config = replace(config, mqtt=replace(config.mqtt, host=host, port=int(port)))
    if device_id:
        config = replace(config, device_id=device_id)
    if bundle:
        config = replace(config, bundle=bundle)
    if state_dir:
        config = replace(config, state_dir=state_dir)
    return validate(config)


def validate(config: AgentConfig) -> AgentConfig:
    if not JOB_ID_RE.match(config.device_id):
        raise ConfigError(
            "bad_config", f"device id {config.device_id!r}: use 1-128 characters of A-Za-z0-9._:-"
        )
    if any(c in config.mqtt.prefix for c in "+#") or not config.mqtt.prefix:
        raise ConfigError("bad_config", "mqtt.prefix must be a non-empty topic without wildcards")
    if not 1 <= config.mqtt.port <= 65535:
        raise ConfigError("bad_config", f"mqtt.port {config.mqtt.port} is not a TCP port")
    if min(config.jobs.queue_size, config.jobs.max_tokens_limit, config.jobs.max_batch) < 1:
        raise ConfigError(
            "bad_config", "jobs.queue_size, jobs.max_tokens_limit and jobs.max_batch must be >= 1"
        )
    if config.jobs.prefill_chunk < 0:
        raise ConfigError(
            "bad_config",
            f"jobs.prefill_chunk must be >= 0 (0 = prompts whole), got {config.jobs.prefill_chunk}",
        )
    validate_telemetry(config.telemetry)
    validate_tls(config.mqtt)
    for pattern in config.mqtt.reply_topics:
        try:
            expanded = pattern.format(prefix=config.mqtt.prefix, device=config.device_id)
        except (KeyError, IndexError, ValueError):
            expanded = ""  # braces other than {prefix} and {device}
        if not is_valid_topic_filter(expanded):
            raise ConfigError(
                "bad_config",
                f"mqtt.reply_topics: {pattern!r} is not an MQTT topic filter "
                "(placeholders: {prefix}, {device})",
            )
    if config.runtime.backend not in ("auto", "onnxruntime", "tensorrt"):
        raise ConfigError(
            "bad_config",
            f"runtime.backend {config.runtime.backend!r}: this agent supports auto, onnxruntime, "
            "tensorrt",
        )
    return config


def validate_tls(mqtt: MqttConfig, names: dict[str, str] | None = None) -> None:
    """Checked at start, before the (slow) bundle load: a typo in a path must not surface as a
    TLS handshake that never completes. `names` maps a field to what the caller calls it (the
    fleet tool's `--ca` flag, say); by default the agent's config key `mqtt.<field>`."""
    label = {f: (names or {}).get(f, f"mqtt.{f}") for f in ("ca_file", "cert_file", "key_file")}
    if bool(mqtt.cert_file) != bool(mqtt.key_file):
        raise ConfigError("bad_config", f"{label['cert_file']} and {label['key_file']} go together")
    for option, name in label.items():
        value = getattr(mqtt, option)
        if value and not Path(value).is_file():
            raise ConfigError("bad_config", f"{name} {value} is not a file")

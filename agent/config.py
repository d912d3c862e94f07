"""Agent configuration: a TOML file, flag overrides, and a sane default for every key.

`edge-agent run --bundle DIR` alone works against a broker on localhost:1883 (DESIGN.md).

The file's schema is the dataclasses below: `ConfigFile` has one field per `[section]`, each
section one field per key, and a key's type is its type hint (`typing.get_type_hints`), not its
default value. An unknown section or key, or a value of the wrong type, is a `bad_config` error
naming `section.key`, the expected type and the value, in one line.

A leaf: this module imports only the standard library, agent.errors and agent.state_dir (the
fleet tool imports it on a laptop without numpy or tokenizers; tests/test_layering.py checks).
"""

from __future__ import annotations

import os
import socket
import tomllib
import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from agent.contract.payload import JOB_ID_RE
from agent.errors import ConfigError
from agent.state_dir import StateDir

# The device id goes into topics: the contract's id syntax.
DEVICE_ID_RE = JOB_ID_RE
# Prompt tokens prefilled per step while other jobs decode (agent.batching uses it). Measured
# (int4, this 2-core machine, a 1,500-token prompt joining): prefilled whole it held the running
# jobs' next token for 1.2 s; in chunks of 256 for at most 0.22 s per step, and the chunks took no
# longer in all (1.13 s). Most chat prompts fit in one chunk, so they join after one step.
PREFILL_CHUNK = 256
TEGRASTATS = "/usr/bin/tegrastats"
DEFAULT_TEGRASTATS_CMD = f"{TEGRASTATS} --interval 1000"


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
    # Starts of an update's verify-and-test stage (each written before the candidate is loaded):
    # after this many, a candidate that keeps killing the agent ends `failed`/`crash_loop`.
    max_attempts: int = 3
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


def default_tegrastats_cmd() -> str | None:
    """On a Jetson (JetPack installs /usr/bin/tegrastats) read it; elsewhere there is none."""
    return DEFAULT_TEGRASTATS_CMD if os.path.exists(TEGRASTATS) else None


@dataclass(frozen=True)
class TelemetryConfig:
    """`[telemetry]`. `tegrastats_cmd` is a whole command line, not a flag, so recorded tegrastats
    output can be replayed through the same code path the device uses (`cat capture.txt`)."""

    interval_s: float = 10.0
    # None or "" = do not run tegrastats (NVML or /proc is used instead).
    tegrastats_cmd: str | None = field(default_factory=default_tegrastats_cmd)
    # Prometheus /metrics endpoint; 0 = off. Bound to metrics_addr only: loopback by default, since
    # the figures describe the site's workload.
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"


def validate_telemetry(config: TelemetryConfig) -> TelemetryConfig:
    """Reject values that would make the publisher spin or the metrics server fail late."""
    if not 0.5 <= config.interval_s <= 3600:
        raise ConfigError(
            "bad_config",
            f"telemetry.interval_s {config.interval_s} must be between 0.5 and 3600 seconds",
        )
    if not 0 <= config.metrics_port <= 65535:
        raise ConfigError(
            "bad_config",
            f"telemetry.metrics_port {config.metrics_port} is not a TCP port (0 = off)",
        )
    return config


@dataclass(frozen=True)
class DeviceSection:
    """`[device]`: `id` is the device id used in topics (default: the host name)."""

    id: str | None = None


@dataclass(frozen=True)
class BundleSection:
    """`[bundle]`: `path` is the bundle directory run when no OTA slot holds one."""

    path: Path | None = None


@dataclass(frozen=True)
class StateSection:
    """`[state]`: `dir` holds the journal, the OTA slots and state (agent/state_dir.py)."""

    dir: Path | None = None


@dataclass(frozen=True)
class ConfigFile:
    """The schema of agent.toml: one field per section."""

    device: DeviceSection = DeviceSection()
    bundle: BundleSection = BundleSection()
    state: StateSection = StateSection()
    mqtt: MqttConfig = MqttConfig()
    jobs: JobsConfig = JobsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    ota: OtaConfig = OtaConfig()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


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

    @property
    def state(self) -> StateDir:
        """The paths inside the state dir."""
        return StateDir(self.state_dir)


def _default_device_id() -> str:
    name = socket.gethostname().split(".")[0]
    return name if DEVICE_ID_RE.match(name) else "edge-device"


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/edge-agent")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "edge-agent"


def _kind(hint: Any) -> str:
    """A type hint as the config error names it."""
    options = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (Union, types.UnionType) and len(options) == 1:
        return _kind(options[0])
    if get_origin(hint) is tuple:
        return "a list of strings"
    if hint is Path:
        return "a path (a string)"
    if hint is float:
        return "a number"
    return {bool: "true or false", int: "an integer", str: "a string"}.get(hint, str(hint))


# What a TOML value of each scalar type may be (an integer is a fine float, a bool no integer).
_ACCEPTS: dict[Any, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    Path: lambda v: isinstance(v, str),
}


def _convert(hint: Any, value: Any) -> Any:
    """`value` (as TOML gives it) as the type `hint` says, or raise TypeError."""
    if get_origin(hint) in (Union, types.UnionType):  # `X | None`: TOML has no null, so X
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return _convert(inner, value)
    if get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise TypeError(hint)
        return tuple(_convert(get_args(hint)[0], v) for v in value)
    accepts = _ACCEPTS.get(hint)
    if accepts is None or not accepts(value):
        raise TypeError(hint)
    return hint(value)


def _read_table(cls: type[Any], raw: Any, name: str | None, source: str) -> Any:
    """A TOML table as the dataclass `cls`: the whole file (`name` None: its keys are sections)
    or the section `[name]`, every key checked against its type hint."""
    if not isinstance(raw, dict):
        raise ConfigError("bad_config", f"[{name}] must be a table, got {name} = {raw!r}")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        if name is None:
            what = f"{source}: unknown section(s) {', '.join(f'[{k}]' for k in unknown)}"
        else:
            what = (
                f"[{name}]: unknown key(s) {', '.join(f'{name}.{k} = {raw[k]!r}' for k in unknown)}"
            )
        raise ConfigError("bad_config", f"{what} (known: {', '.join(known)})")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if name is None:
            values[key] = _read_table(hints[key], value, key, source)
            continue
        try:
            values[key] = _convert(hints[key], value)
        except TypeError:
            raise ConfigError(
                "bad_config", f"{name}.{key} must be {_kind(hints[key])}, got {value!r}"
            ) from None
    return cls(**values)


def read_config_file(raw: dict[str, Any], source: str = "the config") -> ConfigFile:
    """A parsed agent.toml as `ConfigFile`: unknown sections and keys and wrong types refused."""
    file: ConfigFile = _read_table(ConfigFile, raw, None, source)
    return file


def load_config(path: Path | None) -> AgentConfig:
    """Read a TOML config file (or none: all defaults)."""
    if path is None:
        return AgentConfig()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("bad_config", f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError("bad_config", f"cannot read {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("bad_config", f"{path} is not valid TOML: {exc}") from exc
    file = read_config_file(raw, str(path))
    config = AgentConfig(
        mqtt=file.mqtt, jobs=file.jobs, runtime=file.runtime, ota=file.ota, telemetry=file.telemetry
    )
    if file.device.id is not None:
        config = replace(config, device_id=file.device.id)
    if file.bundle.path is not None:
        config = replace(config, bundle=file.bundle.path)
    if file.state.dir is not None:
        config = replace(config, state_dir=file.state.dir)
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
    from agent.topics import is_valid_topic_filter  # paho's, imported when checked, not on import

    if not DEVICE_ID_RE.match(config.device_id):
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

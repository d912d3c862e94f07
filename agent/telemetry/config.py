"""The `[telemetry]` section of agent.toml.

`tegrastats_cmd` is a whole command line, not a flag, so recorded tegrastats output can be replayed
through the same code path the device uses (`cat capture.txt`, or a loop with sleeps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from agent.errors import ConfigError

TEGRASTATS = "/usr/bin/tegrastats"
DEFAULT_TEGRASTATS_CMD = f"{TEGRASTATS} --interval 1000"


def default_tegrastats_cmd() -> str | None:
    """On a Jetson (JetPack installs /usr/bin/tegrastats) read it; elsewhere there is none."""
    return DEFAULT_TEGRASTATS_CMD if os.path.exists(TEGRASTATS) else None


@dataclass(frozen=True)
class TelemetryConfig:
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

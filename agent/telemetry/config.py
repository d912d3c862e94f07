"""The `[telemetry]` section of agent.toml: defined with the other sections in agent/config.py
(the config is one typed schema, a leaf module); these names stay importable from here."""

from __future__ import annotations

from agent.config import (
    DEFAULT_TEGRASTATS_CMD,
    TEGRASTATS,
    TelemetryConfig,
    default_tegrastats_cmd,
    validate_telemetry,
)

__all__ = [
    "DEFAULT_TEGRASTATS_CMD",
    "TEGRASTATS",
    "TelemetryConfig",
    "default_tegrastats_cmd",
    "validate_telemetry",
]

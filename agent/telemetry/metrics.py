"""Optional Prometheus `/metrics` endpoint with the figures of the last telemetry payload.

Off unless `telemetry.metrics_port` is set; `prometheus-client` is imported only then, so a
device without it (or without the need) carries nothing. Values follow Prometheus' base units
(bytes, seconds, watts, ratios stay percent as the payload has them) and are read from the
collector's last payload, so a scrape and an MQTT message never disagree.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError
from agent.telemetry.collector import TelemetryCollector


@dataclass
class MetricsServer:
    port: int
    _server: Any
    _thread: Any

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    port: int, collector: TelemetryCollector, addr: str = "127.0.0.1"
) -> MetricsServer:
    """Serve /metrics on addr:port (0 = any free port) in a daemon thread."""
    try:
        client = importlib.import_module("prometheus_client")
        core = importlib.import_module("prometheus_client.core")
        registry_mod = importlib.import_module("prometheus_client.registry")
    except ImportError:
        raise ConfigError(
            "bad_config",
            "telemetry.metrics_port is set but prometheus-client is not installed: "
            "pip install 'edge-llm[metrics]' or set metrics_port = 0",
        ) from None
    registry = registry_mod.CollectorRegistry(auto_describe=False)
    registry.register(_PayloadCollector(collector, core))
    try:
        server, thread = client.start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigError(
            "bad_config", f"cannot serve /metrics on {addr}:{port}: {exc.strerror or exc}"
        ) from exc
    return MetricsServer(int(server.server_port), server, thread)


class _PayloadCollector:
    """A prometheus_client custom collector: builds gauge families at each scrape."""

    def __init__(self, collector: TelemetryCollector, core: Any) -> None:
        self._collector = collector
        self._core = core

    def collect(self) -> Iterator[Any]:
        gauge = self._core.GaugeMetricFamily
        payload = self._collector.last_payload
        engine = (payload or {}).get("engine") or {}
        info = gauge(
            "edge_agent_info",
            "The agent's device, engine and telemetry source (value 1)",
            labels=["device", "engine", "version", "source"],
        )
        info.add_metric(
            [
                str((payload or {}).get("device", "")),
                str(engine.get("name", "")),
                str(engine.get("version", "")),
                self._collector.source,
            ],
            1,
        )
        yield info
        if payload is None:
            return
        jobs = gauge("edge_agent_jobs", "Jobs by state", labels=["state"])
        for state, count in payload["jobs"].items():
            jobs.add_metric([state], count)
        yield jobs
        yield from _perf(gauge, payload["perf"])
        yield from _system(gauge, payload["system"])


def _perf(gauge: Any, perf: dict[str, Any]) -> Iterator[Any]:
    if perf["tokens_per_s"] is not None:
        yield gauge(
            "edge_agent_decode_tokens_per_second",
            "Decode rate over the jobs of the last minute",
            value=perf["tokens_per_s"],
        )
    ttft = gauge(
        "edge_agent_ttft_seconds",
        "Time to first token over the jobs of the last minute",
        labels=["quantile"],
    )
    for quantile, key in (("0.5", "p50"), ("0.99", "p99")):
        if perf["ttft_ms"][key] is not None:
            ttft.add_metric([quantile], perf["ttft_ms"][key] / 1000)
    yield ttft


def _system(gauge: Any, system: dict[str, Any]) -> Iterator[Any]:
    scalars = (
        ("edge_agent_cpu_percent", "Mean CPU load of the online cores", "cpu_pct", 1.0),
        ("edge_agent_gpu_percent", "GPU load", "gpu_pct", 1.0),
        ("edge_agent_ram_used_bytes", "RAM in use", "ram_used_mb", 2.0**20),
        ("edge_agent_ram_total_bytes", "RAM installed", "ram_total_mb", 2.0**20),
    )
    for name, help_text, key, scale in scalars:
        if system[key] is not None:
            yield gauge(name, help_text, value=system[key] * scale)
    temps = gauge("edge_agent_temperature_celsius", "Temperature by sensor", labels=["sensor"])
    for sensor, celsius in (system["temps_c"] or {}).items():
        temps.add_metric([sensor], celsius)
    yield temps
    power = gauge("edge_agent_power_watts", "Power by rail", labels=["rail"])
    for rail, milliwatts in (system["power_mw"] or {}).items():
        power.add_metric([rail], milliwatts / 1000)
    yield power

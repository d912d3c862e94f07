"""Builds the telemetry payload (DESIGN.md) and publishes it every `interval_s`.

The system figures come from one source, chosen at start and re-checked at every snapshot:
tegrastats while its command gives fresh lines (a Jetson: the only source of its power rails),
else NVML (a discrete NVIDIA GPU; CPU and RAM still from /proc), else /proc alone. A source that
stops (tegrastats killed, say) is replaced at the next snapshot, and the change is logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.events import utc_now_iso
from agent.telemetry.config import TelemetryConfig
from agent.telemetry.energy import JobEnergy, PowerSeries
from agent.telemetry.nvml import GpuReading, NvmlSource
from agent.telemetry.perf import PerfWindow
from agent.telemetry.procfs import ProcfsSource
from agent.telemetry.reading import SystemReading
from agent.telemetry.tegrastats import TegrastatsReader

log = logging.getLogger(__name__)

JOB_COUNTERS = ("queued", "running", "done", "failed")


class TelemetryCollector:
    def __init__(
        self,
        config: TelemetryConfig,
        *,
        perf: PerfWindow | None = None,
        procfs: ProcfsSource | None = None,
        open_nvml: Callable[[], NvmlSource | None] = NvmlSource.open,
        power_sample_s: float = 1.0,
        tegrastats_stale_s: float = 15.0,
    ) -> None:
        self.config = config
        self.perf = perf if perf is not None else PerfWindow()
        self.power = PowerSeries()
        self._procfs = procfs if procfs is not None else ProcfsSource()
        self._open_nvml = open_nvml
        self._power_sample_s = power_sample_s
        self._tegrastats_stale_s = tegrastats_stale_s
        self._tegrastats: TegrastatsReader | None = None
        self._nvml: NvmlSource | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._source: str | None = None
        self._last_payload: dict[str, Any] | None = None
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, wait_s: float = 3.0) -> None:
        """Start tegrastats (waiting up to `wait_s` for its first line) or NVML, whichever works."""
        command = self.config.tegrastats_cmd
        if command:
            reader = TegrastatsReader(
                command, series=self.power, stale_after_s=self._tegrastats_stale_s
            )
            if reader.start():
                self._tegrastats = reader
                if not reader.wait_first(wait_s):
                    log.warning(
                        "no tegrastats line within %.0f s; using /proc until one comes", wait_s
                    )
        if self._tegrastats is None or self._tegrastats.latest() is None:
            self._nvml = self._open_nvml()
            if self._nvml is not None:
                # NVML is read on demand: sample its power so job energy has a series to integrate.
                self._sampler = threading.Thread(
                    target=self._sample_nvml_power, name="edge-agent-nvml-power", daemon=True
                )
                self._sampler.start()
        log.info("telemetry source: %s", self.source)

    def stop(self) -> None:
        self._stop.set()
        if self._tegrastats is not None:
            self._tegrastats.stop()
        if self._sampler is not None:
            self._sampler.join(timeout=3)
        if self._nvml is not None:
            self._nvml.close()

    # --- figures ---------------------------------------------------------------------------

    @property
    def source(self) -> str:
        if self._tegrastats is not None and self._tegrastats.latest() is not None:
            return "tegrastats"
        return "nvml" if self._nvml is not None else "procfs"

    def system(self) -> SystemReading:
        sample = self._tegrastats.latest() if self._tegrastats is not None else None
        if sample is not None:
            reading = sample.to_reading()
        elif self._nvml is not None:
            reading = _merge_gpus(self._procfs.read(), self._nvml.read())
        else:
            reading = self._procfs.read()
        if reading.source != self._source:
            if self._source is not None:
                log.warning("telemetry source changed from %s to %s", self._source, reading.source)
            self._source = reading.source
        return reading

    def record_job(self, ttft_ms: float, tokens: int, decode_s: float) -> None:
        """A finished job that produced a first token (see PerfWindow.record)."""
        self.perf.record(ttft_ms, tokens, decode_s)

    def job_energy(self, start: float, end: float, tokens: int) -> JobEnergy | None:
        """Energy of a job run between two `time.monotonic()` instants; None without rails."""
        return self.power.job_energy(start, end, tokens)

    def snapshot(
        self, jobs: Mapping[str, int], engine: Mapping[str, Any] | None, device: str
    ) -> dict[str, Any]:
        """The telemetry payload, exactly DESIGN.md's keys; null where a figure is not known."""
        payload: dict[str, Any] = {
            "ts": utc_now_iso(),
            "device": device,
            "engine": dict(engine) if engine is not None else None,
            "jobs": {name: int(jobs.get(name, 0)) for name in JOB_COUNTERS},
            "perf": self.perf.figures().to_payload(),
            "system": self.system().to_payload(),
        }
        with self._lock:
            self._last_payload = payload
        return payload

    @property
    def last_payload(self) -> dict[str, Any] | None:
        """The payload built last (what /metrics exposes between publications)."""
        with self._lock:
            return self._last_payload

    def _sample_nvml_power(self) -> None:
        while not self._stop.wait(self._power_sample_s):
            nvml = self._nvml
            if nvml is None:
                return
            watts = [g.power_mw for g in nvml.read() if g.power_mw is not None]
            if watts:
                self.power.add(time.monotonic(), sum(watts))


def _merge_gpus(base: SystemReading, gpus: list[GpuReading]) -> SystemReading:
    utils = [g.util_pct for g in gpus if g.util_pct is not None]
    temps = dict(base.temps_c)
    power = dict(base.power_mw)
    for gpu in gpus:
        if gpu.temp_c is not None:
            temps[f"gpu{gpu.index}"] = gpu.temp_c
        if gpu.power_mw is not None:
            power[f"gpu{gpu.index}"] = gpu.power_mw
    return SystemReading(
        source="nvml",
        cpu_pct=base.cpu_pct,
        ram_used_mb=base.ram_used_mb,
        ram_total_mb=base.ram_total_mb,
        gpu_pct=sum(utils) / len(utils) if utils else None,
        temps_c=temps,
        power_mw=power,
    )


class TelemetryPublisher:
    """A thread that builds and publishes a payload now and then every `interval_s` until stopped.

    `build` is the caller's (it knows the job counters and the engine); a failure in one round is
    logged and the next round still runs: telemetry must never take the agent down.
    """

    def __init__(
        self,
        interval_s: float,
        build: Callable[[], dict[str, Any]],
        publish: Callable[[dict[str, Any]], None],
    ) -> None:
        self.interval_s = interval_s
        self._build = build
        self._publish = publish
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-telemetry", daemon=True)
        self.published = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        failing = False
        while True:
            try:
                self._publish(self._build())
                self.published += 1
                failing = False
            except Exception:
                if not failing:  # once per run of failures, not every interval
                    log.exception("could not publish telemetry")
                failing = True
            if self._stop.wait(self.interval_s):
                return

"""System figures from /proc and /sys: works on any Linux, needs no package and no privilege.

CPU load is a rate, so it comes from the difference between two reads of /proc/stat: each read
reports the load since the previous one (the first since this source was created). RAM "used" is
MemTotal - MemAvailable, the figure that says how close the machine is to swapping or the OOM
killer; page cache that can be dropped is not counted as used.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from agent.telemetry.reading import SystemReading

log = logging.getLogger(__name__)

# /proc/stat cpu columns: user nice system idle iowait irq softirq steal guest guest_nice.
_IDLE_COLUMNS = (3, 4)  # idle, iowait
_COUNTED_COLUMNS = 8  # guest time is already inside user/nice


class ProcfsSource:
    name = "procfs"

    def __init__(
        self, proc: Path = Path("/proc"), thermal: Path = Path("/sys/class/thermal")
    ) -> None:
        self._proc = proc
        self._thermal = thermal
        self._lock = threading.Lock()
        self._last_cpu = self._cpu_times()

    def read(self) -> SystemReading:
        used, total = self._memory_mb()
        return SystemReading(
            source=self.name,
            cpu_pct=self._cpu_pct(),
            ram_used_mb=used,
            ram_total_mb=total,
            temps_c=self.temps_c(),
        )

    def close(self) -> None:
        """Nothing to release; here so every source has the same shape."""

    def _cpu_times(self) -> tuple[int, int] | None:
        """(busy, total) jiffies over all CPUs, or None where /proc/stat cannot be read."""
        try:
            with open(self._proc / "stat", encoding="ascii") as f:
                first = f.readline().split()
        except OSError:
            return None
        if not first or first[0] != "cpu":
            return None
        values = [int(v) for v in first[1 : 1 + _COUNTED_COLUMNS]]
        idle = sum(values[i] for i in _IDLE_COLUMNS if i < len(values))
        total = sum(values)
        return total - idle, total

    def _cpu_pct(self) -> float | None:
        now = self._cpu_times()
        with self._lock:
            last, self._last_cpu = self._last_cpu, now if now is not None else self._last_cpu
        if now is None or last is None:
            return None
        busy = now[0] - last[0]
        total = now[1] - last[1]
        if total <= 0:
            return None  # read twice within one tick: no information yet
        return max(0.0, min(100.0, 100.0 * busy / total))

    def _memory_mb(self) -> tuple[float | None, float | None]:
        fields: dict[str, int] = {}
        try:
            with open(self._proc / "meminfo", encoding="ascii") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        fields[key] = int(parts[0])  # kB
        except OSError:
            return None, None
        total = fields.get("MemTotal")
        available = fields.get("MemAvailable")
        if total is None:
            return None, None
        if available is None:  # kernels before 3.14
            available = fields.get("MemFree", 0) + fields.get("Cached", 0)
        return (total - available) / 1024, total / 1024

    def temps_c(self) -> dict[str, float]:
        """Thermal zones by type (cpu-thermal, gpu-thermal, ...); absent where there are none."""
        temps: dict[str, float] = {}
        try:
            zones = sorted(self._thermal.glob("thermal_zone*"))
        except OSError:
            return temps
        for zone in zones:
            try:
                kind = (zone / "type").read_text(encoding="ascii").strip() or zone.name
                millidegrees = int((zone / "temp").read_text(encoding="ascii").strip())
            except (OSError, ValueError):
                continue  # a zone that is off or unreadable says nothing
            name = kind
            n = 1
            while name in temps:
                n += 1
                name = f"{kind}_{n}"
            temps[name] = millidegrees / 1000
        return temps

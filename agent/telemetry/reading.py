"""One reading of the system figures, whichever source it came from.

Every source (tegrastats, NVML, /proc) reports into this one shape so the payload builder and the
Prometheus exporter never care where a number came from. None means "this hardware or source does
not report it", never zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SystemReading:
    source: str  # "tegrastats" | "nvml" | "procfs"
    cpu_pct: float | None = None
    ram_used_mb: float | None = None
    ram_total_mb: float | None = None
    gpu_pct: float | None = None
    temps_c: Mapping[str, float] = field(default_factory=dict)
    power_mw: Mapping[str, float] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """The telemetry payload's `system` object (DESIGN.md): null where not reported."""
        return {
            "cpu_pct": _round(self.cpu_pct, 1),
            "ram_used_mb": _round_int(self.ram_used_mb),
            "ram_total_mb": _round_int(self.ram_total_mb),
            "gpu_pct": _round(self.gpu_pct, 1),
            "temps_c": {k: round(v, 2) for k, v in self.temps_c.items()} or None,
            "power_mw": {k: round(v) for k, v in self.power_mw.items()} or None,
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _round_int(value: float | None) -> int | None:
    return None if value is None else round(value)

"""GPU figures from NVML (`nvidia-ml-py`, imported as `pynvml`) beside a discrete NVIDIA GPU.

Optional twice over: the package is not a dependency, and a machine without the NVIDIA driver has
no NVML library. Either way `NvmlSource.open()` returns None and the collector uses /proc. NVML
does not report the Jetson's integrated GPU, so on a Jetson tegrastats is used instead.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    util_pct: float | None
    mem_used_mb: float | None
    mem_total_mb: float | None
    temp_c: float | None
    power_mw: float | None


class NvmlSource:
    name = "nvml"

    def __init__(self, nvml: ModuleType, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles
        self._names = [_text(nvml.nvmlDeviceGetName(h)) for h in handles]
        self._lock = threading.Lock()

    @classmethod
    def open(cls) -> NvmlSource | None:
        """NVML with at least one GPU, or None (no package, no driver, no GPU) without raising."""
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return None
        try:
            nvml.nvmlInit()
            count = int(nvml.nvmlDeviceGetCount())
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:  # pynvml raises NVMLError subclasses, or OSError for the .so
            log.debug("NVML is not usable here: %s", exc)
            return None
        if not handles:
            _quietly(nvml.nvmlShutdown)
            return None
        return cls(nvml, handles)

    def read(self) -> list[GpuReading]:
        """One reading per GPU; a figure the GPU does not support is None."""
        nvml = self._nvml
        gpus: list[GpuReading] = []
        with self._lock:
            for index, handle in enumerate(self._handles):
                util = _quietly(lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                memory = _quietly(lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h))
                temp = _quietly(
                    lambda h=handle: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
                )
                power = _quietly(lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h))  # mW
                gpus.append(
                    GpuReading(
                        index=index,
                        name=self._names[index],
                        util_pct=None if util is None else float(util),
                        mem_used_mb=None if memory is None else memory.used / 2**20,
                        mem_total_mb=None if memory is None else memory.total / 2**20,
                        temp_c=None if temp is None else float(temp),
                        power_mw=None if power is None else float(power),
                    )
                )
        return gpus

    def close(self) -> None:
        _quietly(self._nvml.nvmlShutdown)


def _quietly(call: Any) -> Any:
    """NVML raises NVMLError_NotSupported for figures a GPU lacks: that is None, not a failure."""
    try:
        return call()
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

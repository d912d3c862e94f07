"""Device telemetry: what the machine and the model are doing, published every few seconds.

One source of system figures is chosen per device (`collector.py`): `tegrastats` on a Jetson (the
only place its power rails can be read), NVML beside a discrete NVIDIA GPU, /proc everywhere else.
Job figures (`perf.py`) and job energy (`energy.py`) are fed by the agent's worker.
"""

from agent.telemetry.collector import TelemetryCollector, TelemetryPublisher
from agent.telemetry.config import TelemetryConfig
from agent.telemetry.energy import JobEnergy, PowerSeries
from agent.telemetry.perf import PerfFigures, PerfWindow
from agent.telemetry.reading import SystemReading

__all__ = [
    "JobEnergy",
    "PerfFigures",
    "PerfWindow",
    "PowerSeries",
    "SystemReading",
    "TelemetryCollector",
    "TelemetryConfig",
    "TelemetryPublisher",
]

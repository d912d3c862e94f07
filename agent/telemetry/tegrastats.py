"""`tegrastats` on a Jetson: parse its lines field by field, and read them from a running command.

Each Jetson Linux release prints more or fewer fields, in another order, with other rail and
sensor names (R36.3 run as a user has no EMC_FREQ and no engines; R36.4.4 drops a rail; older
boards print `POM_5V_IN 1116/1116` without units or `GPU 0/0` as a rail). So the parser never
counts positions: it walks `NAME VALUE` pairs and `name@TEMPC` tokens, classifies each value by
its shape, and skips whatever it does not recognise.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.telemetry.energy import PowerSeries
from agent.telemetry.reading import SystemReading

log = logging.getLogger(__name__)

# Rails that already measure the module's whole input; where one is present it is the total, and
# adding the other rails to it would count them twice. Without one (AGX Orin, AGX Xavier) the
# total is the sum of the rails that are printed.
TOTAL_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")

_PARENTHESES = re.compile(r"\([^()]*\)")
_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_TEMP = re.compile(r"([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C")
_MEMORY = re.compile(r"(\d+)/(\d+)(kB|MB|GB)")
_POWER = re.compile(r"(\d+)(?:mW)?/(\d+)(?:mW)?")
_LOAD = re.compile(r"(\d+(?:\.\d+)?)%(?:@(\d+|\[[\d,]*\]))?")
_FREQ = re.compile(r"\d+")
_CORE = re.compile(r"(\d+(?:\.\d+)?)%(?:@(\d+))?")
_MB_PER_UNIT = {"kB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
# Thermal zones that are switched off read as -256 C on some boards (Xavier's CV0..CV2).
_MIN_VALID_TEMP_C = -60.0


@dataclass(frozen=True)
class CpuCore:
    load_pct: float
    freq_mhz: int | None


@dataclass(frozen=True)
class Engine:
    """A hardware unit line `NAME 12%@1300`, `NAME 0%@[0,0]`, `NAME off` or `NAME 174` (MHz)."""

    on: bool
    load_pct: float | None = None
    freq_mhz: int | None = None  # the highest of a per-cluster list such as GR3D's `@[0,0]`


@dataclass(frozen=True)
class TegrastatsSample:
    ram_used_mb: float | None = None
    ram_total_mb: float | None = None
    swap_used_mb: float | None = None
    swap_total_mb: float | None = None
    cpu_cores: tuple[CpuCore | None, ...] = ()  # None = core switched off by the power mode
    engines: Mapping[str, Engine] = field(default_factory=dict)  # EMC_FREQ, GR3D_FREQ, NVENC, ...
    temps_c: Mapping[str, float] = field(default_factory=dict)
    power_mw: Mapping[str, float] = field(default_factory=dict)  # rail -> current mW
    power_avg_mw: Mapping[str, float] = field(default_factory=dict)  # rail -> tegrastats' average

    @property
    def cpu_pct(self) -> float | None:
        """Mean load over the cores that are on: an off core is not idle capacity."""
        online = [core.load_pct for core in self.cpu_cores if core is not None]
        return sum(online) / len(online) if online else None

    @property
    def gpu_pct(self) -> float | None:
        gr3d = self.engines.get("GR3D_FREQ")
        return gr3d.load_pct if gr3d is not None else None

    @property
    def emc_pct(self) -> float | None:
        emc = self.engines.get("EMC_FREQ")
        return emc.load_pct if emc is not None else None

    @property
    def total_power_mw(self) -> float | None:
        for rail in TOTAL_INPUT_RAILS:
            if rail in self.power_mw:
                return self.power_mw[rail]
        return sum(self.power_mw.values()) if self.power_mw else None

    def to_reading(self) -> SystemReading:
        return SystemReading(
            source="tegrastats",
            cpu_pct=self.cpu_pct,
            ram_used_mb=self.ram_used_mb,
            ram_total_mb=self.ram_total_mb,
            gpu_pct=self.gpu_pct,
            temps_c=dict(self.temps_c),
            power_mw=dict(self.power_mw),
        )


def parse_line(line: str) -> TegrastatsSample | None:
    """One tegrastats line, or None when nothing in it is a tegrastats field."""
    tokens = _PARENTHESES.sub(" ", line).split()
    memory: dict[str, tuple[float, float]] = {}
    cores: tuple[CpuCore | None, ...] = ()
    engines: dict[str, Engine] = {}
    temps: dict[str, float] = {}
    power: dict[str, float] = {}
    power_avg: dict[str, float] = {}
    found = False
    i = 0
    while i < len(tokens):
        token = tokens[i]
        temp = _TEMP.fullmatch(token)
        if temp is not None:
            value = float(temp.group(2))
            if value > _MIN_VALID_TEMP_C:
                temps[temp.group(1)] = value
            found = True
            i += 1
            continue
        value_token = tokens[i + 1] if i + 1 < len(tokens) else ""
        if not _NAME.fullmatch(token) or not value_token:
            i += 1
            continue
        consumed = True
        if (m := _MEMORY.fullmatch(value_token)) is not None:
            scale = _MB_PER_UNIT[m.group(3)]
            memory[token] = (int(m.group(1)) * scale, int(m.group(2)) * scale)
        elif (m := _POWER.fullmatch(value_token)) is not None:
            power[token] = float(m.group(1))
            power_avg[token] = float(m.group(2))
        elif token == "CPU" and value_token.startswith("[") and value_token.endswith("]"):
            cores = _parse_cores(value_token[1:-1])
        elif (m := _LOAD.fullmatch(value_token)) is not None:
            engines[token] = Engine(True, float(m.group(1)), _parse_freq(m.group(2)))
        elif value_token == "off":
            engines[token] = Engine(False)
        elif _FREQ.fullmatch(value_token):
            engines[token] = Engine(True, None, int(value_token))
        else:
            consumed = False  # a name we do not know followed by a value we do not know
        if consumed:
            found = True
            i += 2
        else:
            i += 1
    if not found:
        return None
    ram = memory.get("RAM")
    swap = memory.get("SWAP")
    return TegrastatsSample(
        ram_used_mb=ram[0] if ram else None,
        ram_total_mb=ram[1] if ram else None,
        swap_used_mb=swap[0] if swap else None,
        swap_total_mb=swap[1] if swap else None,
        cpu_cores=cores,
        engines=engines,
        temps_c=temps,
        power_mw=power,
        power_avg_mw=power_avg,
    )


def _parse_cores(inner: str) -> tuple[CpuCore | None, ...]:
    cores: list[CpuCore | None] = []
    for item in inner.split(","):
        m = _CORE.fullmatch(item.strip())
        if m is not None:
            cores.append(CpuCore(float(m.group(1)), int(m.group(2)) if m.group(2) else None))
        else:
            cores.append(None)  # "off", or a shape we do not know: not counted as online
    return tuple(cores)


def _parse_freq(text: str | None) -> int | None:
    if not text:
        return None
    if text.startswith("["):
        values = [int(v) for v in text[1:-1].split(",") if v]
        return max(values) if values else None
    return int(text)


@dataclass(frozen=True)
class _Latest:
    sample: TegrastatsSample
    at: float  # monotonic arrival time


class TegrastatsReader:
    """Runs the tegrastats command in a thread and keeps its latest sample and the power series.

    Lines are stamped with their arrival time (monotonic), not the time printed in them: replayed
    captures carry old dates, and jobs are timed on the monotonic clock too. If the command is
    missing or exits, that is logged once and `latest()` goes stale, so the collector falls back.
    """

    def __init__(
        self,
        command: str,
        *,
        series: PowerSeries | None = None,
        stale_after_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.command = command
        self.series = series if series is not None else PowerSeries()
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: _Latest | None = None
        self._first = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.lines_read = 0
        self.lines_skipped = 0
        self.failure: str | None = None  # why the command stopped giving samples, once it has

    def start(self) -> bool:
        """Start the command; False (logged) when it cannot be run at all."""
        try:
            argv = shlex.split(self.command)
        except ValueError as exc:
            return self._fail(f"telemetry.tegrastats_cmd {self.command!r} is not a command: {exc}")
        if not argv:
            return self._fail("telemetry.tegrastats_cmd is empty")
        try:
            self._process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError as exc:
            return self._fail(
                f"cannot run {argv[0]!r} ({exc.strerror or exc}); using another source"
            )
        self._thread = threading.Thread(
            target=self._read, name="edge-agent-tegrastats", daemon=True
        )
        self._thread.start()
        return True

    def wait_first(self, timeout: float) -> bool:
        """Wait for the first parsed line, so the first snapshot already has rails."""
        return self._first.wait(timeout)

    def latest(self) -> TegrastatsSample | None:
        """The newest sample, or None when there is none younger than `stale_after_s`."""
        with self._lock:
            latest = self._latest
        if latest is None or self._clock() - latest.at > self.stale_after_s:
            return None
        return latest.sample

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _read(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        for line in process.stdout:
            sample = parse_line(line)
            if sample is None:
                self.lines_skipped += 1
                continue
            now = self._clock()
            self.lines_read += 1
            with self._lock:
                self._latest = _Latest(sample, now)
            total = sample.total_power_mw
            if total is not None:
                self.series.add(now, total)
            self._first.set()
        status = process.wait()
        if not self._stopping:
            self._fail(
                f"the tegrastats command {self.command!r} exited with status {status} after "
                f"{self.lines_read} samples; falling back to another source"
            )

    def _fail(self, reason: str) -> bool:
        self.failure = reason
        log.warning("%s", reason)  # once: the reader is never restarted
        return False

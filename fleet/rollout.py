"""`edge-fleet rollout`: update a fleet in growing waves, and stop when too many fail.

A bad bundle should cost one device, not the fleet. So the update goes first to a canary wave
(`canary` devices), then to waves that grow by `growth` (1, 2, 4, 8, ... by default); each wave
runs in parallel and is waited for to the end (every device active, rolled_back, failed, or
timed out). After each wave the failures so far are weighed against `max_failures` (a count,
or a fraction of the devices attempted); past it, no further wave starts and the devices not
attempted are reported `skipped`.

`rollout(broker, devices, command, plan, observer)` takes the update as the contract's
`UpdateCommand`, the waves as a `WavePlan` and the progress callbacks as a `RolloutObserver`.
Planning the waves and the halting decision are pure functions (`plan_waves`,
`failures_exceed`); the MQTT part is `fleet.update.send_command`, once per device.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from agent.config import MqttConfig
from agent.contract.payload import JOB_ID_RE
from fleet.update import OtaStatus, UpdateCommand, UpdateError, UpdateTimeout, send_command

MaxFailures = int | float  # an int is a count of devices; a float in [0, 1] a fraction
SKIPPED = "skipped"
TIMEOUT = "timeout"
MAX_PARALLEL = 64  # MQTT connections opened at once within one wave


# --- pure parts: planning and deciding ---------------------------------------------------------


def plan_waves(devices: Sequence[str], canary: int = 1, growth: float = 2.0) -> list[list[str]]:
    """Split `devices` (in order) into waves: `canary` devices, then each wave `growth` times
    the previous one (rounded up, and never smaller), the last wave taking what is left."""
    check_wave_sizes(canary, growth)
    waves: list[list[str]] = []
    size, start = canary, 0
    while start < len(devices):
        waves.append(list(devices[start : start + size]))
        start += size
        size = max(size, math.ceil(size * growth))
    return waves


def check_wave_sizes(canary: int, growth: float) -> None:
    if canary < 1:
        raise ValueError(f"canary must be at least 1 device, got {canary}")
    if not growth >= 1.0:
        raise ValueError(f"growth must be at least 1.0 (waves never shrink), got {growth}")


def parse_max_failures(text: str) -> MaxFailures:
    """`N` (a count of devices) or `P%` (a percentage of the devices attempted so far)."""
    value = text.strip()
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0.0 <= percent <= 100.0:
                raise ValueError
            return percent / 100.0
        count = int(value)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise ValueError(
            f"max failures {text!r}: a count of devices (0, 1, 2, ...) or a percentage (10%)"
        ) from None


def check_max_failures(max_failures: MaxFailures) -> None:
    if isinstance(max_failures, bool):
        raise ValueError("max_failures must be a count (int) or a fraction (float), not a bool")
    if isinstance(max_failures, int):
        if max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {max_failures}")
    elif not 0.0 <= max_failures <= 1.0:
        raise ValueError(f"a fractional max_failures must be in [0, 1], got {max_failures}")


def failures_exceed(failures: int, attempted: int, max_failures: MaxFailures) -> bool:
    """Have the failures passed the threshold? A count is exceeded by more failures than it
    allows; a fraction by more than that share of the devices attempted so far."""
    check_max_failures(max_failures)
    if isinstance(max_failures, int):
        return failures > max_failures
    return attempted > 0 and failures / attempted > max_failures


def describe_max_failures(max_failures: MaxFailures) -> str:
    if isinstance(max_failures, int):
        return f"{max_failures} device{'s' if max_failures != 1 else ''}"
    return f"{max_failures * 100:g}% of the devices attempted"


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceResult:
    device: str
    state: str  # active | rolled_back | failed | timeout | skipped
    error: str | None = None
    seconds: float | None = None
    wave: int | None = None  # 1-based; None when skipped

    @property
    def failed(self) -> bool:
        return self.state not in ("active", SKIPPED)


@dataclass(frozen=True)
class RolloutSummary:
    update_id: str
    version: str
    results: list[DeviceResult]  # in the order the devices were given
    waves: list[list[str]]  # as planned
    waves_run: int
    halted: bool
    reason: str

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.results:
            counts[result.state] = counts.get(result.state, 0) + 1
        return counts

    @property
    def ok(self) -> bool:
        """Every device is active."""
        return all(r.state == "active" for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "update_id": self.update_id,
            "version": self.version,
            "outcome": "halted" if self.halted else "completed",
            "reason": self.reason,
            "waves": self.waves,
            "waves_run": self.waves_run,
            "counts": self.counts,
            "devices": [asdict(r) for r in self.results],
        }


# --- running it -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WavePlan:
    """How a rollout proceeds: `canary` devices first, then waves `growth` times the last; it
    halts once the failures pass `max_failures` (a count, or a fraction of the devices
    attempted); a device that reaches no final state within `per_device_timeout_s` counts as a
    `timeout` failure. Raises ValueError for a plan that cannot run."""

    canary: int = 1
    growth: float = 2.0
    max_failures: MaxFailures = 0
    per_device_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        check_wave_sizes(self.canary, self.growth)
        check_max_failures(self.max_failures)

    def waves(self, devices: Sequence[str]) -> list[list[str]]:
        return plan_waves(devices, self.canary, self.growth)


def _ignore(*_: object) -> None:
    pass


@dataclass(frozen=True)
class RolloutObserver:
    """What a rollout reports as it goes; every callback defaults to doing nothing. They are
    called one at a time (never concurrently), from worker threads: `on_wave(index, waves)`
    before wave `index` (0-based) starts, `on_status(device, status)` for each ota/status,
    `on_result(result)` when a device is done."""

    on_wave: Callable[[int, list[list[str]]], None] = _ignore
    on_status: Callable[[str, OtaStatus], None] = _ignore
    on_result: Callable[[DeviceResult], None] = _ignore


def new_rollout_id() -> str:
    return f"rollout-{uuid.uuid4().hex[:12]}"


def rollout(
    broker: MqttConfig,
    devices: Sequence[str],
    command: UpdateCommand,
    plan: WavePlan = WavePlan(),
    observer: RolloutObserver = RolloutObserver(),
) -> RolloutSummary:
    """Roll one update (`command`, from `fleet.update.make_command`) out to `devices` in the
    waves of `plan`; return what happened to each. Every device gets the same command, so the
    same update id (one rollout, traceable on every device). Raises ValueError for bad devices
    before anything is sent."""
    _check_devices(devices)
    waves = plan.waves(devices)
    lock = threading.Lock()
    done: dict[str, DeviceResult] = {}

    def update_one(device: str, wave: int) -> DeviceResult:
        def status_seen(status: OtaStatus) -> None:
            with lock:
                observer.on_status(device, status)

        began = time.monotonic()
        try:
            final = send_command(
                broker, device, command, timeout_s=plan.per_device_timeout_s, on_status=status_seen
            )
            result = DeviceResult(
                device, final.state, final.error_text or None, _since(began), wave
            )
        except UpdateTimeout as exc:
            result = DeviceResult(device, TIMEOUT, exc.message, _since(began), wave)
        except UpdateError as exc:
            result = DeviceResult(device, "failed", str(exc), _since(began), wave)
        with lock:
            observer.on_result(result)
        return result

    max_failures = plan.max_failures
    halted, reason, waves_run = False, "", 0
    for index, wave in enumerate(waves):
        with lock:
            observer.on_wave(index, waves)
        with ThreadPoolExecutor(max_workers=min(len(wave), MAX_PARALLEL)) as pool:
            for result in pool.map(update_one, wave, [index + 1] * len(wave)):
                done[result.device] = result
        waves_run += 1
        failures = sum(r.failed for r in done.values())
        if failures_exceed(failures, len(done), max_failures):
            remaining = len(devices) - len(done)
            halted = remaining > 0
            reason = (
                f"{failures} of {len(done)} devices attempted failed, more than the "
                f"{describe_max_failures(max_failures)} allowed"
                + (
                    f"; halted after wave {index + 1}, {remaining} devices skipped"
                    if halted
                    else ""
                )
            )
            break
    if not reason:
        failures = sum(r.failed for r in done.values())
        reason = (
            f"all {len(devices)} devices active"
            if failures == 0
            else f"completed with {failures} failure(s), within the "
            f"{describe_max_failures(max_failures)} allowed"
        )
    results = [done.get(d) or DeviceResult(d, SKIPPED) for d in devices]
    return RolloutSummary(command.id, command.version, results, waves, waves_run, halted, reason)


def _check_devices(devices: Sequence[str]) -> None:
    if not devices:
        raise ValueError("no devices to update: give --devices a,b,c or --devices-file FILE")
    bad = [d for d in devices if not JOB_ID_RE.match(d)]
    if bad:
        raise ValueError(f"invalid device id(s) {', '.join(map(repr, bad))}: use A-Za-z0-9._:-")
    dupes = sorted(d for d, n in Counter(devices).items() if n > 1)
    if dupes:
        raise ValueError(f"device(s) listed twice: {', '.join(dupes)}")


def _since(began: float) -> float:
    return round(time.monotonic() - began, 2)


def format_summary(summary: RolloutSummary) -> str:
    """The table `edge-fleet rollout` prints at the end, then the outcome and the counts."""
    width = max([len("DEVICE"), *(len(r.device) for r in summary.results)])
    lines = [f"{'DEVICE':<{width}}  WAVE  {'STATE':<11}  SECONDS  ERROR"]
    for r in summary.results:
        wave = str(r.wave) if r.wave is not None else "-"
        seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        lines.append(
            f"{r.device:<{width}}  {wave:>4}  {r.state:<11}  {seconds:>7}  {r.error or ''}".rstrip()
        )
    outcome = "HALTED" if summary.halted else "completed"
    lines.append("")
    lines.append(
        f"{outcome}: {summary.reason} ({summary.waves_run} of {len(summary.waves)} waves run, "
        f"update id {summary.update_id})"
    )
    lines.append(", ".join(f"{state} {n}" for state, n in sorted(summary.counts.items())))
    return "\n".join(lines)

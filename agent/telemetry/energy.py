"""Energy of one job from the device's power samples: joules and joules per generated token.

Power is sampled about once a second (tegrastats) while a job may take a fraction of that, so the
integral treats power as linear between samples and holds the nearest sample past either end
(trapezoidal rule over [start, end]). Where no sample lies close enough to the job, or the samples
have a hole in the middle (the reader stalled), the answer is None: a made-up figure would be
worse than none.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

Sample = tuple[float, float]  # (monotonic seconds, total power in mW)


@dataclass(frozen=True)
class JobEnergy:
    joules: float
    j_per_token: float | None  # None for a job that produced no token

    def to_event(self) -> dict[str, Any]:
        """The `energy` object proposed for the job's `done` event."""
        return {
            "joules": round(self.joules, 3),
            "j_per_token": None if self.j_per_token is None else round(self.j_per_token, 4),
        }


class PowerSeries:
    """Thread-safe time series of total power, bounded by age so a long uptime stays small."""

    def __init__(self, keep_s: float = 3600.0, max_gap_s: float = 5.0) -> None:
        self.keep_s = keep_s
        self.max_gap_s = max_gap_s
        self._times: list[float] = []
        self._values: list[float] = []
        self._lock = threading.Lock()

    def add(self, t: float, total_mw: float) -> None:
        with self._lock:
            if self._times and t < self._times[-1]:
                return  # out of order: the clock is monotonic, so this is a stray duplicate
            self._times.append(t)
            self._values.append(total_mw)
            cut = bisect.bisect_left(self._times, t - self.keep_s)
            if cut > len(self._times) // 2:  # trim in batches: amortised O(1)
                del self._times[:cut]
                del self._values[:cut]

    def __len__(self) -> int:
        with self._lock:
            return len(self._times)

    def samples(self, start: float, end: float) -> list[Sample]:
        """Samples in [start - max_gap_s, end + max_gap_s]: all that the integral may use."""
        with self._lock:
            lo = bisect.bisect_left(self._times, start - self.max_gap_s)
            hi = bisect.bisect_right(self._times, end + self.max_gap_s)
            return list(zip(self._times[lo:hi], self._values[lo:hi], strict=True))

    def energy_j(self, start: float, end: float) -> float | None:
        return integrate_mw(self.samples(start, end), start, end, self.max_gap_s)

    def job_energy(self, start: float, end: float, tokens: int) -> JobEnergy | None:
        joules = self.energy_j(start, end)
        if joules is None:
            return None
        return JobEnergy(joules, joules / tokens if tokens > 0 else None)


def integrate_mw(
    samples: Sequence[Sample], start: float, end: float, max_gap_s: float = 5.0
) -> float | None:
    """Joules between `start` and `end` from (time, mW) samples sorted by time, or None."""
    if end < start or not samples:
        return None
    times = [t for t, _ in samples]
    if not _covered(times, start, end, max_gap_s):
        return None
    first = bisect.bisect_left(times, start)
    last = bisect.bisect_right(times, end)
    inside = samples[first:last]
    if end == start:
        return 0.0
    points = [
        (start, _power_at(samples, times, start)),
        *inside,
        (end, _power_at(samples, times, end)),
    ]
    millijoules = sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in pairwise(points))
    return millijoules / 1000.0


def _covered(times: Sequence[float], start: float, end: float, max_gap_s: float) -> bool:
    """Every instant of [start, end] lies within max_gap_s of a sample (no stall, no guessing)."""
    for t in (start, end):
        j = bisect.bisect_left(times, t)
        nearest = min(abs(times[k] - t) for k in (j - 1, j) if 0 <= k < len(times))
        if nearest > max_gap_s:
            return False
    for a, b in pairwise(times):
        if b <= start or a >= end:
            continue
        middle = min(max((a + b) / 2, start), end)  # the point of the hole farthest from both
        if min(middle - a, b - middle) > max_gap_s:
            return False
    return True


def _power_at(samples: Sequence[Sample], times: Sequence[float], t: float) -> float:
    """Linear between the samples around `t`; the nearest sample's value past either end."""
    j = bisect.bisect_left(times, t)
    if j == 0:
        return samples[0][1]
    if j == len(samples):
        return samples[-1][1]
    (t0, p0), (t1, p1) = samples[j - 1], samples[j]
    if t1 == t0:
        return p1
    return p0 + (p1 - p0) * (t - t0) / (t1 - t0)

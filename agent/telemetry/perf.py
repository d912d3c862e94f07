"""Speed of the jobs finished in the last minute: decode tokens/s and TTFT percentiles.

The telemetry payload describes the device now, not since boot, so old jobs fall out of the
window. tokens/s is total decoded tokens over total decode time (a long job weighs more than a
short one, which is what throughput means), not the mean of per-job rates.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PerfFigures:
    jobs: int  # jobs in the window
    tokens_per_s: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None

    def to_payload(self) -> dict[str, object]:
        """The telemetry payload's `perf` object (DESIGN.md); null when no job ran lately."""
        return {
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 2),
            "ttft_ms": {
                "p50": None if self.ttft_p50_ms is None else round(self.ttft_p50_ms, 2),
                "p99": None if self.ttft_p99_ms is None else round(self.ttft_p99_ms, 2),
            },
        }


@dataclass(frozen=True)
class _Job:
    finished_at: float
    ttft_ms: float
    tokens: int
    decode_s: float


class PerfWindow:
    """Rolling window of finished jobs; `record` from the worker, `figures` from the publisher."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._jobs: deque[_Job] = deque()
        self._lock = threading.Lock()

    def record(
        self, ttft_ms: float, tokens: int, decode_s: float, finished_at: float | None = None
    ) -> None:
        """One job that produced a first token: `tokens` were decoded in `decode_s` after it.

        `finished_at` is on the same clock as the window (monotonic by default); now if omitted.
        """
        job = _Job(self._clock() if finished_at is None else finished_at, ttft_ms, tokens, decode_s)
        with self._lock:
            self._jobs.append(job)
            self._expire(self._clock())

    def figures(self, now: float | None = None) -> PerfFigures:
        now = self._clock() if now is None else now
        with self._lock:
            self._expire(now)
            since = now - self.window_s
            jobs = [j for j in self._jobs if since <= j.finished_at <= now]
        decode_s = sum(j.decode_s for j in jobs)
        tokens = sum(j.tokens for j in jobs)
        ttfts = sorted(j.ttft_ms for j in jobs)
        return PerfFigures(
            jobs=len(jobs),
            tokens_per_s=tokens / decode_s if decode_s > 0 else None,
            ttft_p50_ms=percentile(ttfts, 50),
            ttft_p99_ms=percentile(ttfts, 99),
        )

    def _expire(self, now: float) -> None:
        while self._jobs and self._jobs[0].finished_at < now - self.window_s:
            self._jobs.popleft()


def percentile(ordered: Sequence[float], pct: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default) over sorted values."""
    if not ordered:
        return None
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

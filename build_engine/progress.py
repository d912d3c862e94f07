"""Progress lines for the long build steps: numbered, with the time since the start."""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[str], None]


class Steps:
    """`steps("exporting ...")` prints `[3/6] exporting ... (+21 s)`."""

    def __init__(self, progress: Progress, total: int) -> None:
        self._progress = progress
        self._total = total
        self._index = 0
        self._start = time.monotonic()

    def __call__(self, message: str) -> None:
        self._index += 1
        elapsed = time.monotonic() - self._start
        self._progress(f"[{self._index}/{self._total}] {message} (+{elapsed:.0f} s)")

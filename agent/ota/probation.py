"""Probation after a switch: if the agent dies abnormally N times within T after switching to a
new bundle, the next start rolls back to the previous slot by itself.

"Died abnormally" is detected with a marker file: written at start, removed at a clean exit. A
marker found at start means the previous run crashed, was killed or lost power.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.ota.store import write_atomically
from agent.state_dir import StateDir


@dataclass(frozen=True)
class Probation:
    slot: str  # the new slot on trial
    previous: str  # where to go back to
    update_id: str
    version: str
    until: float  # wall-clock end of the trial
    crashes: int = 0


class ProbationGuard:
    def __init__(self, state_dir: Path, max_crashes: int, window_s: float) -> None:
        self._file = StateDir(state_dir).probation
        self._marker = StateDir(state_dir).running_marker
        self.max_crashes = max_crashes
        self.window_s = window_s

    def begin(self, slot: str, previous: str, update_id: str, version: str) -> None:
        probation = Probation(slot, previous, update_id, version, time.time() + self.window_s)
        write_atomically(self._file, json.dumps(asdict(probation)).encode())

    def current(self) -> Probation | None:
        try:
            return Probation(**json.loads(self._file.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def on_start(self) -> Probation | None:
        """Call once at start. Returns the probation to roll back from when it has failed."""
        crashed = self._marker.exists()
        self._marker.parent.mkdir(parents=True, exist_ok=True)
        self._marker.write_text(str(time.time()))
        probation = self.current()
        if probation is None:
            return None
        if time.time() > probation.until:
            self.end()  # survived the trial: the new bundle is committed
            return None
        if not crashed:
            return None
        probation = Probation(**{**asdict(probation), "crashes": probation.crashes + 1})
        write_atomically(self._file, json.dumps(asdict(probation)).encode())
        return probation if probation.crashes >= self.max_crashes else None

    def on_clean_exit(self) -> None:
        self._marker.unlink(missing_ok=True)

    def end(self) -> None:
        self._file.unlink(missing_ok=True)

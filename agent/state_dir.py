"""The layout of the agent's state dir, composed in one place (DESIGN.md: the state dir holds the
job journal, the installed bundles (A/B) and the OTA state, outside both slots).

    journal.sqlite3          the job journal (agent/journal.py)
    agent.running            present while the agent runs (the probation guard's crash marker)
    bundles/a, bundles/b     the A/B slots; bundles/current links to the one that runs
    ota/state.json           the update in progress
    ota/finished.json        the final status of the last updates
    ota/slots.json           the verified marks of the slots
    ota/high_water.json      the highest version ever run (anti-rollback)
    ota/probation.json       the trial of a freshly switched bundle
    ota/download/            partial downloads

Stdlib-only, imported by agent.config (a leaf).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

JOURNAL_FILE = "journal.sqlite3"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL_FILE

    @property
    def running_marker(self) -> Path:
        return self.root / "agent.running"

    @property
    def bundles(self) -> Path:
        """The slots' parent: `bundles/a`, `bundles/b` and the `bundles/current` link."""
        return self.root / "bundles"

    @property
    def ota(self) -> Path:
        return self.root / "ota"

    @property
    def ota_state(self) -> Path:
        return self.ota / "state.json"

    @property
    def ota_finished(self) -> Path:
        return self.ota / "finished.json"

    @property
    def slot_marks(self) -> Path:
        return self.ota / "slots.json"

    @property
    def high_water(self) -> Path:
        return self.ota / "high_water.json"

    @property
    def probation(self) -> Path:
        return self.ota / "probation.json"

    @property
    def downloads(self) -> Path:
        return self.ota / "download"

    @classmethod
    def of_bundles(cls, bundles: Path) -> StateDir:
        """The state dir whose `bundles` folder this is."""
        return cls(bundles.parent)

    def check_writable(self) -> None:
        """The journal, the OTA slots and the probation record all live here: a directory the
        agent cannot write (a read-only mount, a path under a file) is a config error, said in
        one line before anything starts, not a traceback from whichever write happens first."""
        probe = self.root / f".edge-agent-probe-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                "bad_state_dir",
                f"the state dir {self.root} is not writable ({reason}): point --state-dir or "
                "[state] dir at a writable directory",
            ) from exc

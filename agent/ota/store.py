"""The persisted OTA state: one JSON file, replaced atomically, so a power cut at any instant
leaves either the old record or the new one, never half of each."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from agent.errors import AgentError
from agent.events import utc_now_iso
from agent.ota.command import UpdateCommand, update_command_from_dict

OtaStateName = Literal[
    "downloading", "verifying", "testing", "switching", "active", "failed", "rolled_back"
]
FINAL_STATES = frozenset({"active", "failed", "rolled_back"})


@dataclass(frozen=True)
class OtaRecord:
    command: UpdateCommand
    state: OtaStateName
    slot: str | None = None  # the slot the new bundle is installed into
    previous: str | None = None  # the slot that was current when the update started
    error: dict[str, str] | None = None
    progress: float = 0.0
    updated: str = ""
    # Starts of the verify-and-test stage so far (agent.ota.installer caps them: `crash_loop`).
    attempts: int = 0

    def moved_to(self, state: OtaStateName, **changes: Any) -> OtaRecord:
        return replace(self, state=state, updated=utc_now_iso(), **changes)

    def status_payload(self) -> dict[str, Any]:
        """The `ota/status` message (DESIGN.md)."""
        return {
            "id": self.command.id,
            "state": "testing" if self.state == "switching" else self.state,
            "version": self.command.version,
            "progress": round(self.progress, 3),
            "error": self.error,
        }


def write_atomically(path: Path, data: bytes) -> None:
    """tmp file + fsync + rename + fsync of the directory: durable and all-or-nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class OtaStore:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self._max_bytes = max_bytes

    def load(self) -> OtaRecord | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            command = update_command_from_dict(data["command"], self._max_bytes)
            return OtaRecord(
                command=command,
                state=data["state"],
                slot=data.get("slot"),
                previous=data.get("previous"),
                error=data.get("error"),
                progress=float(data.get("progress", 0.0)),
                updated=str(data.get("updated", "")),
                attempts=int(data.get("attempts", 0)),  # absent in state from older agents
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AgentError):
            # Unreadable state cannot be resumed; the running bundle is still whatever `current`
            # points at, so forgetting the half-done update is the safe choice.
            self.path.rename(self.path.with_name(self.path.name + ".corrupt"))
            return None

    def save(self, record: OtaRecord) -> None:
        data = asdict(record)
        data["command"] = record.command.to_json()
        write_atomically(self.path, json.dumps(data, indent=2).encode("utf-8"))


FINISHED_KEPT = 256  # finished update ids remembered, so a replayed command is not run again


class FinishedLog:
    """The final `ota/status` of the last FINISHED_KEPT updates (`state_dir/ota/finished.json`),
    oldest first. An update id found here is never run again: its final status is re-announced.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (ValueError, UnicodeDecodeError):
            self.path.rename(self.path.with_name(self.path.name + ".corrupt"))
            return []
        if not isinstance(data, list):
            return []
        return [e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str)]

    def get(self, update_id: str) -> dict[str, Any] | None:
        return next((e for e in self.entries() if e["id"] == update_id), None)

    def add(self, status: dict[str, Any]) -> None:
        """Remember (or replace) a final status."""
        kept = [e for e in self.entries() if e["id"] != status["id"]]
        kept.append(status)
        write_atomically(self.path, json.dumps(kept[-FINISHED_KEPT:]).encode("utf-8"))

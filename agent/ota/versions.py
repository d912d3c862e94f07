"""Anti-rollback (DESIGN.md, second revision): bundle versions in PEP 440 order, and the highest
version this device ever activated.

The high-water mark is one small JSON file in the state dir, outside both A/B slots, replaced
atomically. It only ever goes up: an activation raises it, a probation rollback leaves it, and the
bundle the agent boots with seeds it (a device provisioned with version 3 refuses version 2 from
its first update on).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from packaging.version import InvalidVersion, Version

from agent.events import utc_now_iso
from agent.ota.errors import OtaError
from agent.ota.store import write_atomically
from agent.state_dir import StateDir

log = logging.getLogger(__name__)


def parse_version(text: str) -> Version:
    """`text` as a PEP 440 version, or OtaError `bad_version`."""
    try:
        return Version(text)
    except InvalidVersion:
        raise OtaError(
            "bad_version",
            f"the bundle's version {text!r} is not a PEP 440 version (e.g. 2, 2.1, 2.1.post1, "
            "3.0rc1), so this device cannot tell whether it is newer than what it runs: "
            "rebuild the bundle with such a version",
        ) from None


def is_pep440(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return True


class HighWater:
    """`state_dir/ota/high_water.json`: `{"version", "updated"}`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = StateDir(state_dir).high_water

    def version(self) -> str | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            text = data["version"]
            Version(text)
            return str(text)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, InvalidVersion) as exc:
            # Never silently forget it: an unreadable mark would let any old bundle in.
            raise OtaError(
                "bad_state",
                f"{self.path} is unreadable ({exc}); it records the highest bundle version this "
                "device ran. Restore it, or delete it to accept any version once",
            ) from exc

    def raise_to(self, version: str) -> None:
        """Record `version` if it is higher than the mark (a non-PEP 440 version is ignored)."""
        try:
            new = Version(version)
        except InvalidVersion:
            log.warning("version %r is not PEP 440: the high-water mark stays as it is", version)
            return
        try:
            current = self.version()
        except OtaError as exc:
            log.error("%s", exc)
            return
        if current is not None and Version(current) >= new:
            return
        record = {"version": version, "updated": utc_now_iso()}
        write_atomically(self.path, json.dumps(record).encode("utf-8"))
        log.info("highest activated bundle version is now %s", version)

    def check(self, version: str, *, allow_downgrade: bool) -> None:
        """Refuse `version` unless it is newer than the mark (or the operator allows a
        downgrade). Raises OtaError `bad_version` or `downgrade`."""
        new = parse_version(version)
        if allow_downgrade:
            return
        current = self.version()
        if current is None or new > Version(current):
            return
        same = "the same version as" if new == Version(current) else "older than"
        raise OtaError(
            "downgrade",
            f"version {version} is {same} version {current}, the highest this device has "
            "activated: refused (anti-rollback). To roll back on purpose, send the command with "
            '"allow_downgrade": true (edge-fleet update/rollout --allow-downgrade)',
        )

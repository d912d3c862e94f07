"""A/B bundle slots under the state dir, and the `current` symlink that says which one runs.

`bundles/a` and `bundles/b` hold bundles; `bundles/current` is a relative symlink to one of them.
Switching writes a new symlink beside it and renames it over `current` (rename is atomic), so at
every instant `current` names a complete, verified bundle.

A slot may only be booted (or rolled back to) when it carries a verified mark: an entry in
`state_dir/ota/slots.json` (outside the bundle, whose file set is checked for extra files) written
after the bundle passed its signature, every file hash and its canaries on this device, naming its
version and the sha256 of its exact `manifest.json`. Emptying a slot removes its mark first, so a
half-written or refused bundle never has one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.bundle import MANIFEST_NAME
from agent.events import utc_now_iso
from agent.ota.store import write_atomically
from agent.state_dir import StateDir

SLOTS = ("a", "b")


@dataclass(frozen=True)
class SlotMark:
    version: str
    manifest_sha256: str
    verified: str  # when (UTC)


def manifest_sha256(bundle_dir: Path) -> str | None:
    try:
        return hashlib.sha256((bundle_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    except OSError:
        return None


class Slots:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.current_link = root / "current"
        self.marks_path = StateDir.of_bundles(root).slot_marks

    def path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        return self.root / slot

    def current(self) -> str | None:
        """The slot `current` points at, or None before the first update."""
        try:
            target = os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None
        return target if target in SLOTS else None

    def current_path(self) -> Path | None:
        slot = self.current()
        return self.path(slot) if slot is not None else None

    def inactive(self) -> str:
        """The slot an update may overwrite: never the current one."""
        return "b" if self.current() == "a" else "a"

    def prepare(self, slot: str) -> Path:
        """Empty the slot for a new bundle (its verified mark goes first)."""
        self.unmark(slot)
        path = self.path(slot)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def discard(self, slot: str) -> None:
        """Remove a refused bundle: its mark, then its files. Never the current slot."""
        if slot == self.current():
            raise ValueError(f"slot {slot!r} is current: it cannot be discarded")
        self.unmark(slot)
        shutil.rmtree(self.path(slot), ignore_errors=True)

    # --- verified marks ----------------------------------------------------------------------

    def marks(self) -> dict[str, SlotMark]:
        try:
            data = json.loads(self.marks_path.read_text(encoding="utf-8"))
            return {s: SlotMark(**data[s]) for s in SLOTS if isinstance(data.get(s), dict)}
        except FileNotFoundError:
            return self._legacy_marks()
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
            return {}  # unreadable: no slot is trusted (the configured bundle still boots)

    def has_marks_file(self) -> bool:
        return self.marks_path.exists()

    def mark_verified(self, slot: str, version: str) -> SlotMark:
        digest = manifest_sha256(self.path(slot))
        if digest is None:
            raise ValueError(f"slot {slot!r} holds no manifest to mark")
        mark = SlotMark(version, digest, utc_now_iso())
        self._write_marks({**self.marks(), slot: mark})
        return mark

    def unmark(self, slot: str) -> None:
        marks = self.marks()
        if slot in marks or not self.has_marks_file():
            marks.pop(slot, None)
            self._write_marks(marks)

    def verified(self, slot: str) -> SlotMark | None:
        """The slot's mark if it still matches the manifest in the slot, else None."""
        mark = self.marks().get(slot)
        if mark is None or manifest_sha256(self.path(slot)) != mark.manifest_sha256:
            return None
        return mark

    def _legacy_marks(self) -> dict[str, SlotMark]:
        """A state dir from before verified marks: its `current` slot was only ever switched to
        after every check passed, so it is adopted; the other slot is not (it may hold a bundle
        that was refused)."""
        current = self.current()
        if current is None:
            return {}
        digest = manifest_sha256(self.path(current))
        if digest is None:
            return {}
        try:
            data = json.loads((self.path(current) / MANIFEST_NAME).read_bytes())
            version = str(data.get("version", "")) if isinstance(data, dict) else ""
        except (OSError, ValueError):
            return {}
        return {current: SlotMark(version, digest, "adopted")}

    def _write_marks(self, marks: dict[str, SlotMark]) -> None:
        data = {slot: asdict(mark) for slot, mark in sorted(marks.items())}
        write_atomically(self.marks_path, json.dumps(data, indent=2).encode("utf-8"))

    def switch_to(self, slot: str) -> None:
        """Atomically make `slot` current."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "current.new"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(slot, tmp)
        os.replace(tmp, self.current_link)
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

"""A/B bundle slots under the state dir, and the `current` symlink that says which one runs.

`bundles/a` and `bundles/b` hold bundles; `bundles/current` is a relative symlink to one of them.
Switching writes a new symlink beside it and renames it over `current` (rename is atomic), so at
every instant `current` names a complete, verified bundle.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SLOTS = ("a", "b")


class Slots:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.current_link = root / "current"

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
        """Empty the slot for a new bundle."""
        path = self.path(slot)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

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

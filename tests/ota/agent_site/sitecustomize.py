"""Loaded by every Python process started with this directory on PYTHONPATH (`site` imports
`sitecustomize` at start-up): the tests' agent subprocesses, via `tests.ota.hold.hold_env`.

With EDGE_TEST_OTA_HOLD="STATE=SECONDS[,STATE=SECONDS]" it makes the OTA installer pause for
SECONDS after entering STATE (once the state is persisted and announced), so that a test can
kill the agent at exactly that step. The production code knows nothing of this: it wraps
`OtaInstaller.stage_entered`, a no-op seam, when `agent.ota.installer` is first imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

HOLD_ENV = "EDGE_TEST_OTA_HOLD"
TARGET = "agent.ota.installer"


def parse_hold(spec: str) -> dict[str, float]:
    hold: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        state, _, seconds = item.partition("=")
        hold[state] = float(seconds)  # a malformed spec is the test's bug: fail loudly
    return hold


def patch(module: ModuleType, hold: dict[str, float]) -> None:
    installer = module.OtaInstaller
    original = installer.stage_entered

    def stage_entered(self: Any, record: Any) -> None:
        original(self, record)
        seconds = hold.get(record.state)
        if seconds:
            logging.getLogger(TARGET).warning(
                "%s: holding %g s in state %s", HOLD_ENV, seconds, record.state
            )
            time.sleep(seconds)

    installer.stage_entered = stage_entered


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds TARGET with the normal machinery, then patches the module once it has run."""

    def __init__(self, hold: dict[str, float]) -> None:
        self.hold = hold
        self.spec: importlib.machinery.ModuleSpec | None = None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET or self.spec is not None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self.spec = spec
        spec.loader, self._loader = self, spec.loader
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        patch(module, self.hold)


_spec = os.environ.get(HOLD_ENV, "")
if _spec:
    sys.meta_path.insert(0, _PatchOnImport(parse_hold(_spec)))

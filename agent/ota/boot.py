"""Which bundle to run at start: probation rollback first, then the first bundle that loads.

Order: the `current` slot, the other slot (the previous bundle), then the configured bundle (the
one the device was provisioned with). A bundle that is damaged is skipped with an error in the
log; only when none loads does the agent stop (or run degraded when the bundles are genuine but
cannot run on this device).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig
from agent.errors import AgentError, BundleError
from agent.ota.probation import ProbationGuard
from agent.ota.slots import SLOTS, Slots
from agent.ota.store import OtaStore
from agent.runtime import LoadedModel, load_model

log = logging.getLogger(__name__)

# Bundle problems that leave the agent running (status `degraded`) rather than exiting: the bundle
# is genuine but this device cannot run it.
DEGRADED_CODES = frozenset({"target_mismatch", "unsupported_backend", "tensorrt_unavailable"})


@dataclass
class BootChoice:
    model: LoadedModel | None
    problem: AgentError | None


def roll_back_if_on_failed_probation(config: AgentConfig, guard: ProbationGuard) -> None:
    failed = guard.on_start()
    if failed is None:
        return
    slots = Slots(config.state_dir / "bundles")
    if failed.previous in SLOTS:
        slots.switch_to(failed.previous)
    else:  # there was no slot before: back to the configured bundle
        slots.current_link.unlink(missing_ok=True)
    message = (
        f"the agent died {failed.crashes} times within {guard.window_s:.0f} s of switching to "
        f"version {failed.version}: rolled back to the previous bundle"
    )
    log.error(message)
    store = OtaStore(config.state_dir / "ota" / "state.json", config.ota.max_bundle_bytes)
    record = store.load()
    if record is not None and record.command.id == failed.update_id:
        store.save(record.moved_to("rolled_back", error={"code": "probation_failed",
                                                          "message": message}))  # fmt: skip
    guard.end()


def choose_bundle(config: AgentConfig) -> BootChoice:
    slots = Slots(config.state_dir / "bundles")
    candidates: list[Path] = []
    current = slots.current()
    if current is not None:
        candidates.append(slots.path(current))
        other = slots.path("b" if current == "a" else "a")
        if (other / "manifest.json").is_file():
            candidates.append(other)
    if config.bundle is not None:
        candidates.append(config.bundle)
    if not candidates:
        raise AgentError("bad_config", "no bundle: pass --bundle DIR or set [bundle] path")
    first_error: BundleError | None = None
    degraded: BundleError | None = None
    for path in candidates:
        try:
            model = load_model(path, config.runtime)
        except BundleError as exc:
            log.error("cannot run bundle %s: %s", path, exc)
            first_error = first_error or exc
            if exc.code in DEGRADED_CODES:
                degraded = degraded or exc
            continue
        if path != candidates[0]:
            log.warning("running the fallback bundle %s", path)
        return BootChoice(model, None)
    if degraded is not None:
        return BootChoice(None, degraded)
    assert first_error is not None
    raise first_error

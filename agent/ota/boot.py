"""Which bundle to run at start: probation rollback first, then the first bundle that loads.

Order: the `current` slot, the other slot (the previous bundle), then the configured bundle (the
one the device was provisioned with). A slot is only a candidate when it carries a verified mark
(agent.ota.slots: its bundle passed the signature, hash and canary checks of an update on this
device); an unmarked slot is skipped with the reason in the log. A bundle that is damaged is
skipped with an error in the log; only when none loads does the agent stop (or run degraded when
the bundles are genuine but cannot run on this device). The bundle that boots seeds the
anti-rollback high-water mark (agent.ota.versions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.config import AgentConfig
from agent.contract.bundle import MANIFEST_FILE
from agent.errors import AgentError, BundleError
from agent.ota.probation import ProbationGuard
from agent.ota.slots import SLOTS, Slots
from agent.ota.store import FinishedLog, OtaStore
from agent.ota.versions import HighWater
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
    slots = Slots(config.state.bundles)
    if failed.previous in SLOTS and slots.verified(failed.previous) is not None:
        slots.switch_to(failed.previous)
        back_to = f"the previous bundle (slot {failed.previous})"
    else:  # no slot before, or it no longer holds a verified bundle: the configured bundle
        if failed.previous in SLOTS:
            log.error(
                "slot %s no longer holds a verified bundle: rolling back to the configured one",
                failed.previous,
            )
        slots.current_link.unlink(missing_ok=True)
        back_to = "the configured bundle"
    if failed.slot in SLOTS and failed.slot != slots.current():
        slots.discard(failed.slot)  # the bundle that failed its probation never boots again
    message = (
        f"the agent died {failed.crashes} times within {guard.window_s:.0f} s of switching to "
        f"version {failed.version}: rolled back to {back_to}"
    )
    log.error(message)
    error = {"code": "probation_failed", "message": message}
    store = OtaStore(config.state.ota_state, config.ota.max_bundle_bytes)
    finished = FinishedLog(config.state.ota_finished)
    record = store.load()
    if record is not None and record.command.id == failed.update_id:
        rolled_back = record.moved_to("rolled_back", error=error)
        store.save(rolled_back)
        finished.add(rolled_back.status_payload())
    else:  # a later update ran since (and failed): the probation's own entry says what happened
        entry = finished.get(failed.update_id)
        if entry is not None:
            finished.add({**entry, "state": "rolled_back", "error": error})
    guard.end()


def choose_bundle(config: AgentConfig) -> BootChoice:
    slots = Slots(config.state.bundles)
    candidates: list[Path] = []
    current = slots.current()
    if current is not None:
        other = "b" if current == "a" else "a"
        for slot in (current, other):
            path = slots.path(slot)
            if slot == other and not (path / MANIFEST_FILE).is_file():
                continue
            if slots.verified(slot) is None:
                log.error(
                    "not running slot %s (%s): it carries no verified mark, so its bundle did "
                    "not pass an update's signature, hash and canary checks on this device",
                    slot,
                    path,
                )
                continue
            candidates.append(path)
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
        _seed_high_water(config, model.bundle.manifest.version)
        return BootChoice(model, None)
    if degraded is not None:
        return BootChoice(None, degraded)
    assert first_error is not None
    raise first_error


def _seed_high_water(config: AgentConfig, version: str) -> None:
    try:
        HighWater(config.state_dir).raise_to(version)
    except OSError as exc:  # a full or read-only state dir must not stop the agent
        log.error("cannot record the bundle version %s as the high-water mark: %s", version, exc)

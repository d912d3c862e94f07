"""The OTA installer: runs one update at a time through the persisted state machine.

downloading -> verifying -> testing -> (switching) -> active, or failed; rolled_back comes from
probation (agent.ota.probation). The running model is never touched until the new bundle has
passed every check; the switch itself is an atomic symlink rename plus a model swap between jobs.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.canary import check_golden
from agent.config import OtaConfig, RuntimeConfig
from agent.errors import AgentError
from agent.ota.command import UpdateCommand
from agent.ota.download import check_free_space, download
from agent.ota.errors import OtaError
from agent.ota.probation import ProbationGuard
from agent.ota.slots import Slots
from agent.ota.store import FINAL_STATES, OtaRecord, OtaStateName, OtaStore
from agent.ota.unpack import safe_extract
from agent.runtime import LoadedModel, load_model

log = logging.getLogger(__name__)

# Test and diagnostic knob: "STATE=SECONDS[,STATE=SECONDS]" makes the installer pause after
# entering STATE, so a test can kill the agent at that exact step. Never set in production.
HOLD_ENV = "EDGE_AGENT_OTA_HOLD"


@dataclass
class OtaHooks:
    """What the installer needs from the running agent."""

    publish_status: Callable[[dict[str, Any], bool], None]  # ota/status (payload, retain)
    set_updating: Callable[[bool], None]  # agent status `updating` while an update runs
    activate: Callable[[LoadedModel], None]  # swap the serving model between jobs


class OtaInstaller:
    def __init__(
        self,
        state_dir: Path,
        config: OtaConfig,
        runtime: RuntimeConfig,
        hooks: OtaHooks,
        probation: ProbationGuard,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.hooks = hooks
        self.probation = probation
        self.slots = Slots(state_dir / "bundles")
        self.store = OtaStore(state_dir / "ota" / "state.json", config.max_bundle_bytes)
        self.download_dir = state_dir / "ota" / "download"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._hold = _parse_hold(os.environ.get(HOLD_ENV, ""))

    # --- entry points ----------------------------------------------------------------------

    def submit(self, command: UpdateCommand) -> None:
        """Start an update in the background, unless one is already running."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                running = self.store.load()
                if running is not None and running.command.id == command.id:
                    return  # a repeat of the running update: its own statuses keep coming
                busy = OtaRecord(command, "failed").moved_to(
                    "failed",
                    error={"code": "busy", "message": "another update is in progress; retry"},
                )
                # Not retained: the retained status stays the running update's.
                self.hooks.publish_status(busy.status_payload(), False)
                return
            last = self.store.load()
            if last is not None and last.command.id == command.id and last.state in FINAL_STATES:
                self.hooks.publish_status(last.status_payload(), True)  # already done: say so again
                return
            record = OtaRecord(command, "downloading").moved_to("downloading")
            self._start(record)

    def resume(self) -> None:
        """After a restart: continue an update that was cut short, or re-announce the last one."""
        record = self.store.load()
        if record is None:
            return
        if record.state in FINAL_STATES:
            self.hooks.publish_status(record.status_payload(), True)
            return
        if record.state == "switching" and self.slots.current() == record.slot:
            # The switch happened just before the cut: the agent now runs the new bundle.
            self._save(record.moved_to("active", progress=1.0))
            self._cleanup(record)
            return
        log.info("resuming update %s from state %s", record.command.id, record.state)
        resume_at: OtaStateName = "downloading" if record.state == "downloading" else "verifying"
        with self._lock:
            self._start(record.moved_to(resume_at))

    def wait(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # --- the state machine -----------------------------------------------------------------

    def _start(self, record: OtaRecord) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(record,), name="edge-agent-ota", daemon=True
        )
        self._thread.start()

    def _run(self, record: OtaRecord) -> None:
        self.hooks.set_updating(True)
        try:
            record = self._install(record)
        except AgentError as exc:
            log.error("update %s failed: %s", record.command.id, exc)
            record = self._fail(record, exc.code, exc.message)
        except Exception as exc:  # a bug must fail the update, not the agent
            log.exception("update %s failed unexpectedly", record.command.id)
            record = self._fail(record, "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            self.hooks.set_updating(False)

    def _install(self, record: OtaRecord) -> OtaRecord:
        command = record.command
        archive = self.download_dir / f"{command.id}.tar"
        if record.state == "downloading" or not archive.exists():
            record = self._enter(record.moved_to("downloading"))
            have = archive.stat().st_size if archive.exists() else 0
            check_free_space(self.download_dir, 2 * command.size - have)
            last_sent = [0.0]

            def progress(fraction: float) -> None:
                now = time.monotonic()
                if now - last_sent[0] >= 1.0 or fraction >= 1.0:
                    last_sent[0] = now
                    self.hooks.publish_status(
                        record.moved_to("downloading", progress=fraction).status_payload(), True
                    )

            download(command.url, archive, size=command.size, sha256=command.sha256,
                     progress=progress)  # fmt: skip

        slot = self.slots.inactive()
        record = self._enter(record.moved_to("verifying", slot=slot, previous=self.slots.current()))
        slot_dir = self.slots.prepare(slot)
        safe_extract(archive, slot_dir, max_total_bytes=self.config.max_bundle_bytes)
        self._verify_signature(slot_dir)

        record = self._enter(record.moved_to("testing", progress=0.0))
        candidate = load_model(slot_dir, self.runtime)  # every file hash; target; backend
        problems = check_golden(slot_dir, candidate.backend, candidate.codec)
        if problems:
            candidate.backend.close()
            raise OtaError(
                "canary_failed",
                "the new bundle does not reproduce its golden answers on this device: "
                + "; ".join(problems),
            )

        record = self._enter(record.moved_to("switching"))
        previous = record.previous or self._factory_slot_marker()
        self.probation.begin(slot, previous, command.id, command.version)
        self.slots.switch_to(slot)
        self.hooks.activate(candidate)
        record = self._save(record.moved_to("active", progress=1.0, error=None))
        self._cleanup(record)
        log.info("update %s active: version %s in slot %s", command.id, command.version, slot)
        return record

    def _verify_signature(self, bundle_dir: Path) -> None:
        if not self.config.require_signature:
            return
        from agent.signing import load_trusted_keys, verify_bundle_signature

        trusted = load_trusted_keys(self.config.trusted_keys_dir)
        if not trusted:
            raise OtaError(
                "untrusted",
                f"no trusted update keys in {self.config.trusted_keys_dir}: "
                "install the fleet's public key there (edge-fleet keygen)",
            )
        verify_bundle_signature(bundle_dir, trusted)

    def _factory_slot_marker(self) -> str:
        return "factory"  # no slot was current: rolling back means the configured bundle

    def _fail(self, record: OtaRecord, code: str, message: str) -> OtaRecord:
        # A bundle that was installed into its slot and then refused on this device (its
        # canaries) is rolled back; anything refused earlier simply failed.
        state: OtaStateName = "rolled_back" if code == "canary_failed" else "failed"
        failed = self._save(record.moved_to(state, error={"code": code, "message": message}))
        self._cleanup(failed, keep_partial=code == "download_failed")
        if record.slot is not None and record.slot != self.slots.current():
            shutil.rmtree(self.slots.path(record.slot), ignore_errors=True)
        return failed

    def _cleanup(self, record: OtaRecord, keep_partial: bool = False) -> None:
        if not keep_partial:
            (self.download_dir / f"{record.command.id}.tar").unlink(missing_ok=True)

    def _enter(self, record: OtaRecord) -> OtaRecord:
        record = self._save(record)
        hold = self._hold.get(record.state)
        if hold:
            log.warning("%s: holding %.0f s in state %s", HOLD_ENV, hold, record.state)
            time.sleep(hold)
        return record

    def _save(self, record: OtaRecord) -> OtaRecord:
        self.store.save(record)
        self.hooks.publish_status(record.status_payload(), True)
        return record


def _parse_hold(spec: str) -> dict[str, float]:
    hold: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        state, _, seconds = item.partition("=")
        try:
            hold[state] = float(seconds)
        except ValueError:
            log.warning("ignoring malformed %s entry %r", HOLD_ENV, item)
    return hold

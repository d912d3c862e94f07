"""The OTA installer: runs one update at a time through the persisted state machine.

downloading -> verifying -> testing -> (switching) -> active, or failed; rolled_back comes from
probation (agent.ota.probation). The running model is never touched until the new bundle has
passed every check; the switch itself is an atomic symlink rename plus a model swap between jobs.

Verifying, in this order: the signature of the manifest (read from the archive before anything
else is unpacked), the bundle's target, each listed file at its declared size and sha256 as it is
unpacked, the command's version against the manifest's (`version_mismatch`), the version against
the highest one this device ever activated (`downgrade`, DESIGN.md's anti-rollback); then the
canaries run (and a version with no PEP 440 order is refused, `bad_version`). A refused candidate
is removed from its slot; only a bundle that passed everything gets the slot's verified mark, the
one thing that makes a slot bootable (agent.ota.slots).

One update runs at a time. A different update id that arrives while the running one is still
downloading supersedes it (that one ends `failed`/`superseded`, the new one runs); once it is
verifying or testing, others are refused `busy`. A finished update id sent again is not run again:
its final status is repeated (agent.ota.store.FinishedLog).

Two guards against a candidate that takes the device down instead of failing a check:
- Before the candidate is loaded beside the serving model, its size (from the verified manifest)
  is checked against the memory available (agent.ota.memory): `no_memory` instead of an
  out-of-memory kill.
- Every start of the verify-and-test stage is counted in the persisted record, durably, before the
  candidate is loaded. A candidate that kills the agent while it loads or runs its canaries would
  otherwise be resumed after every restart, forever; after `[ota] max_attempts` starts the next
  resume ends the update `failed`/`crash_loop`, empties the candidate's slot and leaves the
  serving bundle alone (mender caps its retries the same way).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle import Manifest
from agent.canary import check_golden
from agent.config import OtaConfig, RuntimeConfig
from agent.errors import AgentError
from agent.ota.command import UpdateCommand
from agent.ota.download import (
    SPACE_MARGIN_BYTES,
    DownloadPolicy,
    Superseded,
    check_free_space,
    download,
)
from agent.ota.errors import OtaError
from agent.ota.memory import MemoryReader, check_fits, read_mem_available
from agent.ota.probation import ProbationGuard
from agent.ota.slots import SLOTS, Slots
from agent.ota.store import FINAL_STATES, FinishedLog, OtaRecord, OtaStateName, OtaStore
from agent.ota.unpack import extract_bundle
from agent.ota.versions import HighWater, is_pep440, parse_version
from agent.runtime import LoadedModel, choose_backend, load_model

log = logging.getLogger(__name__)

# The states whose start counts as an attempt at the candidate (verify, load, canaries, switch).
TRIAL_STATES = frozenset({"verifying", "testing", "switching"})


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
        *,
        read_memory: MemoryReader = read_mem_available,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.hooks = hooks
        self.probation = probation
        self.slots = Slots(state_dir / "bundles")
        self.store = OtaStore(state_dir / "ota" / "state.json", config.max_bundle_bytes)
        self.finished = FinishedLog(state_dir / "ota" / "finished.json")
        self.high_water = HighWater(state_dir)
        self.download_dir = state_dir / "ota" / "download"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._busy = False  # an update is running (guarded by _lock)
        self._record: OtaRecord | None = None  # the running update's latest record
        self._cancel = threading.Event()  # set: the running download stops (superseded)
        self._next: UpdateCommand | None = None  # runs once the superseded one has stopped
        self._announce: dict[str, Any] | None = None  # the final status `_run` publishes
        self._read_memory = read_memory  # MemAvailable in bytes (injectable for tests)

    # --- entry points ----------------------------------------------------------------------

    def submit(self, command: UpdateCommand) -> None:
        """Start an update in the background, unless one is already running (then: supersede
        it if it is still downloading, else refuse `busy`). Never blocks on the update."""
        with self._lock:
            done = self.finished.get(command.id)
            if done is not None:  # already finished: say so again, never run it twice
                log.info("update %s already finished (%s): not run again", command.id,
                         done.get("state"))  # fmt: skip
                last = self.store.load()
                latest = last is not None and last.command.id == command.id
                self.hooks.publish_status(done, latest and not self._busy)
                return
            if self._busy:
                self._refuse_or_supersede(command)
                return
            self._busy = True
            self._start(OtaRecord(command, "downloading").moved_to("downloading"))

    def _refuse_or_supersede(self, command: UpdateCommand) -> None:
        running = self._record
        if running is not None and running.command.id == command.id:
            return  # a repeat of the running update: its own statuses keep coming
        if self._next is not None and self._next.id == command.id:
            return  # already waiting to run
        if running is not None and running.state == "downloading":
            dropped, self._next = self._next, command
            self._cancel.set()
            log.warning("update %s supersedes %s, which was still downloading", command.id,
                        running.command.id)  # fmt: skip
            if dropped is not None:  # queued behind the download and never started
                self._finish_unstarted(dropped, command)
            return
        state = running.state if running is not None else "running"
        running_id = running.command.id if running is not None else "?"
        busy = OtaRecord(command, "failed").moved_to(
            "failed",
            error={
                "code": "busy",
                "message": f"update {running_id} is {state}; an update can only be superseded "
                "while it downloads: retry when it has finished",
            },
        )
        # Not retained: the retained status stays the running update's.
        self.hooks.publish_status(busy.status_payload(), False)

    def _finish_unstarted(self, command: UpdateCommand, by: UpdateCommand) -> None:
        record = OtaRecord(command, "failed").moved_to(
            "failed", error={"code": "superseded", "message": _superseded_message(by)}
        )
        self._remember(record)
        self.hooks.publish_status(record.status_payload(), False)

    def resume(self) -> None:
        """After a restart: continue an update that was cut short, or re-announce the last one.
        Leftovers of earlier runs (downloads of finished updates, unverified candidates) go."""
        record = self.store.load()
        if record is not None and self._crash_looped(record):
            self._give_up(record)
            self._sweep(None)
            return
        running = record is not None and record.state not in FINAL_STATES
        self._sweep(record if running else None)
        if record is None:
            return
        if record.state in FINAL_STATES:
            if self.finished.get(record.command.id) is None:
                self._remember(record)  # state from before the finished log
            self.hooks.publish_status(record.status_payload(), True)
            return
        if record.state == "switching" and self.slots.current() == record.slot:
            # The switch happened just before the cut: the agent now runs the new bundle.
            self.high_water.raise_to(record.command.version)
            self._save_final(record.moved_to("active", progress=1.0))
            self._cleanup(record)
            return
        log.info("resuming update %s from state %s", record.command.id, record.state)
        resume_at: OtaStateName = "downloading" if record.state == "downloading" else "verifying"
        with self._lock:
            self._busy = True
            self._start(record.moved_to(resume_at))

    def _crash_looped(self, record: OtaRecord) -> bool:
        """The update was cut short in its verify-and-test stage as often as it may start it.
        A switch that completed just before the cut is not a crash loop (it is active)."""
        if record.state not in TRIAL_STATES:
            return False
        if record.state == "switching" and self.slots.current() == record.slot:
            return False
        return record.attempts >= max(1, self.config.max_attempts)

    def _give_up(self, record: OtaRecord) -> None:
        message = (
            f"the agent stopped {record.attempts} times while verifying or testing this update "
            f"(last in state {record.state}; [ota] max_attempts = {self.config.max_attempts}): "
            "the new bundle probably kills the agent when it is loaded or run. It was removed "
            "from its slot; the bundle that was serving keeps serving. Fix the bundle and send "
            "it with a new update id"
        )
        log.error("update %s failed: [crash_loop] %s", record.command.id, message)
        self._discard_candidate(record)  # space first, as in `_fail`
        self._cleanup(record)
        error = {"code": "crash_loop", "message": message}
        self._save_final(record.moved_to("failed", error=error))

    def wait(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # --- the state machine -----------------------------------------------------------------

    def _start(self, record: OtaRecord) -> None:
        self._record = record
        self._thread = threading.Thread(
            target=self._run, args=(record,), name="edge-agent-ota", daemon=True
        )
        self._thread.start()

    def _run(self, record: OtaRecord) -> None:
        self.hooks.set_updating(True)
        while True:
            self._announce = None
            self._execute(record)
            with self._lock:
                following, self._next = self._next, None
                self._cancel.clear()
                if following is None:
                    self._busy = False
                    self._record = None
                announce = self._announce
            # Announced once no longer busy: a command sent on seeing it is not refused `busy`.
            if announce is not None:
                self.hooks.publish_status(announce, True)
            self._cleanup(record)  # the download (a failure removed it already)
            if following is None:
                with self._lock:
                    if not self._busy:  # unless a new update has started meanwhile
                        self.hooks.set_updating(False)
                return
            with self._lock:
                record = OtaRecord(following, "downloading").moved_to("downloading")
                self._record = record

    def _execute(self, record: OtaRecord) -> None:
        """Run one update to a final state, whatever happens on the way."""
        try:
            self._install(record)
        except AgentError as exc:
            message = exc.message
            if exc.code == "superseded" and self._next is not None:
                message = _superseded_message(self._next)
            log.error("update %s failed: [%s] %s", record.command.id, exc.code, message)
            self._fail(exc.code, message)
        except OSError as exc:  # the state disk: full, read-only, gone
            code = "no_space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "io_error"
            log.error("update %s failed: %s", record.command.id, exc)
            self._fail(code, f"the state dir cannot be written ({exc}); the update was removed")
        except Exception as exc:  # a bug must fail the update, not the agent
            log.exception("update %s failed unexpectedly", record.command.id)
            self._fail("internal_error", f"{type(exc).__name__}: {exc}")

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
                     progress=progress, policy=self._policy(), cancel=self._cancel)  # fmt: skip

        with self._lock:  # from here on a newer command is refused `busy`, not superseding
            if self._cancel.is_set():
                raise Superseded()
            slot = self.slots.inactive()
            record = record.moved_to(
                "verifying",
                slot=slot,
                previous=self.slots.current(),
                attempts=record.attempts + 1,  # persisted by `_enter` before anything is loaded
            )
            self._record = record
        log.info("update %s: attempt %d of %d at the new bundle", command.id, record.attempts,
                 self.config.max_attempts)  # fmt: skip
        record = self._enter(record)
        slot_dir = self.slots.prepare(slot)
        manifest = extract_bundle(
            archive,
            slot_dir,
            max_total_bytes=self.config.max_bundle_bytes,
            free_margin_bytes=SPACE_MARGIN_BYTES,
            verify=self._verify_signature if self.config.require_signature else None,
            check_manifest=self._check_runs_here,
        )
        self._check_version(command, manifest)

        record = self._enter(record.moved_to("testing", progress=0.0))
        check_fits(manifest, self._read_memory)  # no_memory: both models would not fit
        candidate = load_model(slot_dir, self.runtime)  # every file hash again; target; backend
        try:
            problems = check_golden(slot_dir, candidate.backend, candidate.codec)
            if problems:
                raise OtaError(
                    "canary_failed",
                    "the new bundle does not reproduce its golden answers on this device: "
                    + "; ".join(problems),
                )
            parse_version(manifest.version)  # bad_version: no order to keep anti-rollback by
            self.slots.mark_verified(slot, manifest.version)  # now, and only now, bootable
            record = self._enter(record.moved_to("switching"))
            previous = record.previous or self._factory_slot_marker()
            self.probation.begin(slot, previous, command.id, command.version)
            self.slots.switch_to(slot)
        except BaseException:
            candidate.backend.close()
            raise
        self.high_water.raise_to(manifest.version)
        self.hooks.activate(candidate)
        record = self._save_final(record.moved_to("active", progress=1.0, error=None), False)
        log.info("update %s active: version %s in slot %s", command.id, command.version, slot)
        return record

    def _policy(self) -> DownloadPolicy:
        return DownloadPolicy(
            deadline_s=self.config.download_deadline_s,
            min_rate_bps=self.config.download_min_rate_bps,
            rate_window_s=self.config.download_rate_window_s,
            follow_redirects=self.config.follow_redirects,
        )

    def _verify_signature(self, bundle_dir: Path) -> None:
        from agent.signing import load_trusted_keys, verify_bundle_signature

        trusted = load_trusted_keys(self.config.trusted_keys_dir)
        if not trusted:
            raise OtaError(
                "untrusted",
                f"no trusted update keys in {self.config.trusted_keys_dir}: "
                "install the fleet's public key there (edge-fleet keygen)",
            )
        verify_bundle_signature(bundle_dir, trusted)

    def _check_runs_here(self, manifest: Manifest) -> None:
        """The bundle's backend and target, from the verified manifest, before its files are
        unpacked: an engine built for other hardware is refused without writing gigabytes."""
        where = Path(f"<update {manifest.name} {manifest.version}>")
        if choose_backend(manifest, self.runtime.backend, where) == "tensorrt":
            from agent.target import check_target, detect_target

            check_target(manifest.target, detect_target(), where)

    def _check_version(self, command: UpdateCommand, manifest: Manifest) -> None:
        """DESIGN.md's anti-rollback, on the verified manifest whose files all matched."""
        if manifest.version != command.version:
            raise OtaError(
                "version_mismatch",
                f"the update command says version {command.version!r} but the signed bundle is "
                f"version {manifest.version!r}: refused. Send the bundle's own version "
                "(`edge-fleet pack` prints the exact command)",
            )
        if is_pep440(manifest.version):
            self.high_water.check(manifest.version, allow_downgrade=command.allow_downgrade)
        # A version with no PEP 440 order is refused `bad_version` once the canaries have run
        # (`_install`): a bundle that does not even answer right is reported as such first.

    def _factory_slot_marker(self) -> str:
        return "factory"  # no slot was current: rolling back means the configured bundle

    def _fail(self, code: str, message: str) -> OtaRecord:
        record = self._record
        assert record is not None
        # A bundle that was installed into its slot and then refused on this device (its
        # canaries) is rolled back; anything refused earlier simply failed.
        state: OtaStateName = "rolled_back" if code == "canary_failed" else "failed"
        # Space first: on a full disk the failure must still be recorded and reported.
        self._discard_candidate(record)
        self._cleanup(record)
        failed = record.moved_to(state, error={"code": code, "message": message})
        return self._save_final(failed, False)

    def _discard_candidate(self, record: OtaRecord) -> None:
        if record.slot is None or record.slot == self.slots.current():
            return
        try:
            self.slots.discard(record.slot)
        except OSError as exc:
            log.error("cannot remove the refused bundle in slot %s: %s", record.slot, exc)

    def _cleanup(self, record: OtaRecord) -> None:
        try:
            (self.download_dir / f"{record.command.id}.tar").unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot remove the download of update %s: %s", record.command.id, exc)

    def _sweep(self, running: OtaRecord | None) -> None:
        """Remove what no update will use: downloads other than the running update's, and any
        non-current slot without a verified mark (a candidate cut short, or refused by an older
        agent)."""
        keep = f"{running.command.id}.tar" if running is not None else None
        if self.download_dir.is_dir():
            for leftover in self.download_dir.iterdir():
                if leftover.name != keep:
                    log.info("removing the stale download %s", leftover)
                    leftover.unlink(missing_ok=True)
        if running is not None and running.state != "downloading":
            return  # its slot is re-prepared when it resumes
        current = self.slots.current()
        for slot in SLOTS:
            path = self.slots.path(slot)
            if slot != current and path.exists() and self.slots.verified(slot) is None:
                log.warning("removing slot %s: it holds no verified bundle", slot)
                try:
                    self.slots.discard(slot)
                except OSError as exc:
                    log.error("cannot remove slot %s: %s", slot, exc)

    def _enter(self, record: OtaRecord) -> OtaRecord:
        record = self._save(record)
        self.stage_entered(record)
        return record

    def stage_entered(self, record: OtaRecord) -> None:
        """Called once each state of the update is persisted and announced, on the update
        thread. Does nothing; the seam where tests pause an update at an exact step
        (tests/ota/agent_site)."""

    def _save(self, record: OtaRecord) -> OtaRecord:
        self._record = record
        self.store.save(record)
        self.hooks.publish_status(record.status_payload(), True)
        return record

    def _save_final(self, record: OtaRecord, announce_now: bool = True) -> OtaRecord:
        """Persist and announce a final state. Persisting may fail (a full disk); announcing
        must not, or the update would look stuck in its last state forever. From the update
        thread the announcement waits until the installer is no longer busy (`_run`)."""
        self._record = record
        try:
            self.store.save(record)
        except OSError as exc:
            log.error("cannot persist the state of update %s: %s", record.command.id, exc)
        self._remember(record)
        if announce_now:
            self.hooks.publish_status(record.status_payload(), True)
        else:
            self._announce = record.status_payload()
        return record

    def _remember(self, record: OtaRecord) -> None:
        try:
            self.finished.add(record.status_payload())
        except OSError as exc:
            log.error("cannot record update %s as finished: %s", record.command.id, exc)


def _superseded_message(by: UpdateCommand) -> str:
    return (
        f"superseded by update {by.id} (version {by.version}) while it was still downloading; "
        "that one runs instead"
    )

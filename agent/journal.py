"""The job journal: every accepted job is on disk before the sender is told it was accepted.

After a crash, a power cut or a reboot the agent re-runs what was accepted but never answered
(`unfinished()`), and a repeated job id is answered from the stored result for `retention_s`
(`stored_answer()`), never recomputed. SQLite in WAL mode. `accepted` is written with
`synchronous=FULL`: the commit is on the disk when it returns, which is the whole point of writing
it before saying it. `started` and the answer are written without the fsync (`synchronous=NORMAL`):
they survive a crash or a kill of the agent at once (the WAL is in the kernel's page cache, and a
poison job that kills the process is what the attempt count is for), and the next `accepted`
commit syncs them; only a power cut in between can lose them, and then the job runs once more
after the reboot and is answered again: never lost. That saves two fsyncs (~0.8 ms here, more on
eMMC) on the way from a job to its first token and from its last token to the answer.

Failures are never silent. A full disk or a damaged file raises `JournalError` with a message that
says what to do; a damaged file found at open is moved aside (kept for inspection) and a new
journal started, and `JobJournal.recovered` says so for the caller to publish.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from agent.errors import AgentError
from agent.state_dir import JOURNAL_FILE as JOURNAL_FILE  # re-exported: tests import it here
from agent.state_dir import StateDir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: acked_at
JobState = Literal["accepted", "started", "done", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    job_id         TEXT NOT NULL UNIQUE,
    state          TEXT NOT NULL CHECK (state IN ('accepted', 'started', 'done', 'failed')),
    request        BLOB NOT NULL,       -- the request payload exactly as received
    reply_topic    TEXT NOT NULL,
    correlation    BLOB,                -- MQTT v5 Correlation Data to echo, if any
    received_at    REAL NOT NULL,       -- wall clock: survives a reboot, unlike monotonic time
    started_at     REAL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    answered_at    REAL,
    answer         TEXT,                -- the final event (done or error), JSON
    acked_at       REAL                 -- when the broker acknowledged the final event (PUBACK)
);
CREATE INDEX IF NOT EXISTS jobs_unanswered ON jobs (state) WHERE answered_at IS NULL;
CREATE INDEX IF NOT EXISTS jobs_answered_at ON jobs (answered_at) WHERE answered_at IS NOT NULL;
"""


class JournalError(AgentError):
    """The journal cannot record or read jobs; `message` says what a person should do."""

    def __init__(self, message: str) -> None:
        super().__init__("journal_error", message)


@dataclass(frozen=True)
class JournaledJob:
    """A job accepted but never answered, to be run again after a restart."""

    job_id: str
    request_payload: bytes
    reply_topic: str
    correlation_data: bytes | None
    received_at: float  # wall clock (time.time())
    state: JobState  # "accepted" (never started) or "started" (interrupted mid-run)
    attempts: int  # how many times it was started: bound re-runs of a job that kills the agent


@dataclass(frozen=True)
class UnackedAnswer:
    """A job's final event that may never have reached the broker."""

    job_id: str
    reply_topic: str
    correlation_data: bytes | None
    answer: dict[str, Any]


@dataclass(frozen=True)
class Recovered:
    """A damaged journal found at open: where it was moved, and why."""

    moved_to: Path
    reason: str

    def as_error(self) -> JournalError:
        return JournalError(
            f"the job journal was damaged ({self.reason}); it was moved to {self.moved_to} and a "
            "new one started: jobs accepted before it may not be re-run or answered again"
        )


class JobJournal:
    def __init__(self, path: Path, retention_s: float = 86400.0) -> None:
        """Open (or create) the journal at `path`, moving a damaged file aside.

        Raises JournalError if the journal cannot be opened or created at all (a full disk, a
        read-only or unwritable state dir).
        """
        self.path = path
        self.retention_s = retention_s
        self.recovered: Recovered | None = None
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise self._translate(exc, "open the journal") from exc
            self.recovered = self._move_aside(str(exc))
            try:
                self._db = self._open()
            except sqlite3.DatabaseError as again:
                raise self._translate(again, "start a new journal") from again

    @classmethod
    def in_state_dir(cls, state_dir: Path, retention_s: float = 86400.0) -> JobJournal:
        return cls(StateDir(state_dir).journal, retention_s)

    # --- the job lifecycle ----------------------------------------------------------------

    def record_accepted(
        self,
        job_id: str,
        request_payload: bytes,
        reply_topic: str,
        correlation_data: bytes | None,
        received_at: float,
    ) -> None:
        """Call before publishing `accepted`: once this returns, the job survives a power cut.

        An id already answered but not yet purged is replaced: the caller checked
        `stored_answer` first, so reaching here means the answer is being deliberately redone.
        """
        with self._write("record the accepted job"):
            self._db.execute(
                """INSERT INTO jobs (job_id, state, request, reply_topic, correlation, received_at)
                   VALUES (?, 'accepted', ?, ?, ?, ?)
                   ON CONFLICT (job_id) DO UPDATE SET
                     state = 'accepted', request = excluded.request,
                     reply_topic = excluded.reply_topic, correlation = excluded.correlation,
                     received_at = excluded.received_at, started_at = NULL, attempts = 0,
                     answered_at = NULL, answer = NULL, acked_at = NULL""",
                (job_id, request_payload, reply_topic, correlation_data, received_at),
            )

    def record_started(self, job_id: str) -> None:
        with self._write("record the job's start", durable=False):
            self._db.execute(
                """UPDATE jobs SET state = 'started', started_at = ?, attempts = attempts + 1
                   WHERE job_id = ? AND answered_at IS NULL""",
                (time.time(), job_id),
            )

    def record_done(self, job_id: str, final_event: dict[str, Any]) -> None:
        """The `done` event as published; kept `retention_s` so a repeated id gets it again."""
        self._answer(job_id, "done", final_event)

    def record_failed(self, job_id: str, error_event: dict[str, Any]) -> None:
        """A final `error` event (engine_error, ...): also the stored answer for a repeated id.

        Refusals that ask the sender to retry (`shutting_down`, `queue_full`) are not failures of
        the job: use `forget` for those, so the id can be submitted again.
        """
        self._answer(job_id, "failed", error_event)

    def record_acked(self, job_id: str) -> None:
        """The broker acknowledged the job's final event: it need not be published again.

        Until then the answer is in paho's memory (or a socket) only; an agent that dies before
        the acknowledgement publishes it again at start (`unacked_answers`)."""
        with self._write("record the answer's delivery", durable=False):
            self._db.execute(
                """UPDATE jobs SET acked_at = ?
                   WHERE job_id = ? AND answered_at IS NOT NULL AND acked_at IS NULL""",
                (time.time(), job_id),
            )

    def forget(self, job_id: str) -> None:
        """Drop a job that will neither be answered nor re-run (the sender was told to resubmit)."""
        with self._write("forget the job"):
            self._db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    # --- reading ---------------------------------------------------------------------------

    def stored_answer(self, job_id: str) -> dict[str, Any] | None:
        """The final event of an answered job still within retention, else None."""
        with self._read("look up a stored answer"):
            row = self._db.execute(
                "SELECT answer, answered_at FROM jobs WHERE job_id = ? AND answer IS NOT NULL",
                (job_id,),
            ).fetchone()
        if row is None or row[1] < time.time() - self.retention_s:
            return None
        answer: dict[str, Any] = json.loads(row[0])
        return answer

    def unacked_answers(self) -> list[UnackedAnswer]:
        """Answers (within retention) whose final event the broker never acknowledged, oldest
        first: published again at start, so an answer never dies with the process."""
        with self._read("list undelivered answers"):
            rows = self._db.execute(
                """SELECT job_id, reply_topic, correlation, answer FROM jobs
                   WHERE answer IS NOT NULL AND acked_at IS NULL AND reply_topic != ''
                     AND answered_at >= ?
                   ORDER BY answered_at, seq""",
                (time.time() - self.retention_s,),
            ).fetchall()
        return [
            UnackedAnswer(
                job_id=row[0],
                reply_topic=row[1],
                correlation_data=None if row[2] is None else bytes(row[2]),
                answer=json.loads(row[3]),
            )
            for row in rows
        ]

    def unfinished(self) -> list[JournaledJob]:
        """Accepted or started but never answered, oldest first: what to run again at start."""
        with self._read("list unfinished jobs"):
            rows = self._db.execute(
                """SELECT job_id, request, reply_topic, correlation, received_at, state, attempts
                   FROM jobs WHERE answered_at IS NULL ORDER BY received_at, seq"""
            ).fetchall()
        return [
            JournaledJob(
                job_id=row[0],
                request_payload=bytes(row[1]),
                reply_topic=row[2],
                correlation_data=None if row[3] is None else bytes(row[3]),
                received_at=row[4],
                state=row[5],
                attempts=row[6],
            )
            for row in rows
        ]

    def purge_expired(self, now: float | None = None) -> int:
        """Delete answers older than the retention period; returns how many.

        Unanswered jobs are never purged here: losing them silently is what the journal exists
        to prevent. The caller decides about those (`forget`, or answer them).
        """
        now = time.time() if now is None else now
        with self._write("purge expired answers"):
            cursor = self._db.execute(
                "DELETE FROM jobs WHERE answered_at IS NOT NULL AND answered_at < ?",
                (now - self.retention_s,),
            )
        return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                log.warning("closing the job journal: %s", exc)

    def __enter__(self) -> JobJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(
                f"cannot create the state dir {self.path.parent} for the job journal "
                f"({exc.strerror or exc}); check [state] dir and its owner"
            ) from exc
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("the job journal is in %s mode, not WAL", mode)
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {check}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"file is not a database this agent can read (schema {version}; this agent "
                    f"knows up to {SCHEMA_VERSION})"
                )
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "acked_at" not in columns:  # a schema 1 journal: its answers count as delivered
                db.execute("ALTER TABLE jobs ADD COLUMN acked_at REAL")
                db.execute("UPDATE jobs SET acked_at = answered_at WHERE answered_at IS NOT NULL")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, reason: str) -> Recovered:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.replace(self.path, target)
            for suffix in ("-wal", "-shm"):  # the WAL belongs to the damaged file, not the new one
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.replace(side, target.with_name(target.name + suffix))
        except OSError as exc:
            raise JournalError(
                f"the job journal {self.path} is damaged ({reason}) and could not be moved aside "
                f"({exc.strerror or exc}); move or delete it by hand, then restart the agent"
            ) from exc
        recovered = Recovered(target, reason)
        log.error("%s", recovered.as_error().message)
        return recovered

    @contextmanager
    def _write(self, what: str, durable: bool = True) -> Iterator[None]:
        """One transaction; `durable=False` commits without waiting for the disk (see above)."""
        with self._lock:
            try:
                if not durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                finally:
                    if not durable:
                        self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise self._translate(exc, what) from exc

    @contextmanager
    def _read(self, what: str) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                raise self._translate(exc, what) from exc

    def _translate(self, exc: sqlite3.Error, what: str) -> JournalError:
        text = str(exc)
        where = self.path.parent
        if "disk is full" in text or "database or disk is full" in text:
            return JournalError(
                f"cannot {what}: the disk holding the job journal ({where}) is full; free space "
                "there (old bundles, logs) — until then jobs cannot be accepted safely"
            )
        if _is_corruption(exc):
            return JournalError(
                f"cannot {what}: the job journal {self.path} is damaged ({text}); restart the "
                "agent to move it aside and start a new one"
            )
        if "readonly" in text or "unable to open" in text or "access permission" in text:
            return JournalError(
                f"cannot {what}: the job journal {self.path} cannot be written ({text}); check "
                f"that the agent's user owns {where} and that the file system is writable"
            )
        return JournalError(f"cannot {what} in the job journal {self.path}: {text}")

    def _answer(self, job_id: str, state: JobState, event: dict[str, Any]) -> None:
        now = time.time()
        with self._write(f"record the job's {state} answer", durable=False):
            # A job answered without being journaled first (refused at the door, cancelled while
            # queued before the journal existed) still gets its answer stored for repeats.
            self._db.execute(
                """INSERT INTO jobs (job_id, state, request, reply_topic, received_at,
                                     answered_at, answer)
                   VALUES (?, ?, x'', '', ?, ?, ?)
                   ON CONFLICT (job_id) DO UPDATE SET
                     state = excluded.state, answered_at = excluded.answered_at,
                     answer = excluded.answer, acked_at = NULL""",
                (job_id, state, now, now, json.dumps(event, ensure_ascii=False)),
            )


def _is_corruption(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return isinstance(exc, sqlite3.DatabaseError) and (
        "file is not a database" in text or "malformed" in text or "database corrupt" in text
    )

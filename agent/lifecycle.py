"""A job's life from admission to its answer, as one object with one method per transition.

    intake:  accepted ──> (queued) ──> worker: started ──> delta* ──> done | failed
                 └──> turned_away (queue full)      └──> finished_unstarted (cancel, deadline)
             shutdown: dropped (still queued)

Each transition writes the journal, publishes and counts in one place, so the rules hold for every
path: an answer is journaled before it is published (through the journal writer's `then`), the id
stays active until its answer is stored, and a job re-run from the journal says `restarted`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent import events
from agent.generation import FinishReason, GenerationResult
from agent.job_queue import Reply, ResultStore
from agent.jobs import JobRequest
from agent.journal import JobJournal
from agent.journal_writer import JournalWriter
from agent.outbox import JobStream, OnAck
from agent.telemetry import TelemetryCollector

log = logging.getLogger(__name__)

# Publish a refusal of a request that was never accepted: (reply, job id, code, message).
Refuse = Callable[[Reply, str | None, str, str], None]


class ActiveIds:
    """One registry of active ids, under one lock, from admission until the answer is stored:
    an id is active, or answered, or unknown, never in between (a job between the queue and the
    batch, or just finished, is still active)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # intake holds it to check and claim an id in one step
        self._active: set[str] = set()
        self._running: dict[str, ActiveJob] = {}

    def is_active(self, job_id: str) -> bool:  # under `lock`
        return job_id in self._active

    def claim(self, job_id: str) -> None:  # under `lock`
        self._active.add(job_id)

    def release(self, job_id: str) -> None:
        with self.lock:
            self._active.discard(job_id)
            self._running.pop(job_id, None)

    def add_running(self, job: ActiveJob) -> None:
        with self.lock:
            self._running[job.id] = job

    def running(self, job_id: str) -> ActiveJob | None:
        with self.lock:
            return self._running.get(job_id)

    def all_running(self) -> list[ActiveJob]:
        with self.lock:
            return list(self._running.values())


@dataclass
class JobBook:
    """What the transitions of every job share."""

    ids: ActiveIds
    results: ResultStore
    writer: JournalWriter
    telemetry: TelemetryCollector
    device_id: str
    refuse: Refuse
    done_count: int = 0
    failed_count: int = 0
    # The worker answers most jobs, the intake those cancelled while queued: `+=` is not atomic.
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, *, done: bool) -> None:
        with self._count_lock:
            if done:
                self.done_count += 1
            else:
                self.failed_count += 1

    def ack_recorder(self, job_id: str) -> OnAck | None:
        """Journals that the broker has the job's final event (else it is sent again at start).
        Called on paho's thread: it only enqueues."""
        if self.writer.journal is None:
            return None
        return lambda: self.writer.write(lambda journal: journal.record_acked(job_id))


@dataclass(eq=False)
class ActiveJob:
    """An accepted job. `generation` is the model generation its `prompt_ids` were encoded for:
    after an update swaps the model, a job still queued is encoded again for the new one."""

    book: JobBook
    request: JobRequest
    prompt_ids: list[int]
    reply: Reply
    events: JobStream  # its accepted/delta/final events, in order, never dropped
    generation: int
    received: float = field(default_factory=time.monotonic)  # monotonic seconds
    # Run again from the journal after the agent stopped: its events carry `"restarted": true`,
    # so a client can tell deltas from `seq` 0 again from a bug.
    restarted: bool = False
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None

    @property
    def id(self) -> str:
        return self.request.id

    def deadline_passed(self, now: float | None = None) -> bool:
        if self.request.deadline_ms is None:
            return False
        now = time.monotonic() if now is None else now
        return (now - self.received) * 1000 >= self.request.deadline_ms

    # --- transitions -----------------------------------------------------------------------

    def accepted(self, position: int) -> None:
        """Queued (journaled already by the intake); called under the queue's lock, so the event
        goes out before a worker can start the job."""
        self.events.event(self._marked(events.accepted(self.id, position)))

    def started(self) -> None:
        self.started_at = time.monotonic()
        self.book.ids.add_running(self)
        self.book.writer.write(lambda journal: journal.record_started(self.id))

    def delta(self, text: str) -> None:
        if self.request.stream:
            self.events.delta(text)

    def done(self, result: GenerationResult, engine: dict[str, str] | None) -> None:
        started = self.started_at if self.started_at is not None else time.monotonic()
        now = time.monotonic()
        done = events.done_from_result(
            self.id,
            result,
            queue_ms=(started - self.received) * 1000,
            total_ms=(now - self.received) * 1000,
            engine=engine,
            device=self.book.device_id,
        )
        telemetry = self.book.telemetry
        if result.completion_tokens:
            telemetry.record_job(
                result.ttft_s * 1000, result.completion_tokens - 1, result.total_s - result.ttft_s
            )
        energy = telemetry.job_energy(started, now, result.completion_tokens)
        if energy is not None:  # only where the hardware reports its power rails
            done["energy"] = energy.to_event()
        self._answer(done)

    def finished_unstarted(self, reason: FinishReason, engine: dict[str, str] | None) -> None:
        """Cancelled or past its deadline before it ran: a `done` with no tokens."""
        waited = (time.monotonic() - self.received) * 1000
        self._answer(
            events.done(
                self.id,
                text="",
                finish_reason=reason,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=0,
                queue_ms=waited,
                ttft_ms=0.0,
                total_ms=waited,
                tokens_per_s=0.0,
                engine=engine,
                device=self.book.device_id,
            )
        )

    def failed(self, code: str, message: str) -> None:
        log.error("job %s failed: [%s] %s", self.id, code, message)
        self.book.count(done=False)
        failure = self._marked(events.error(self.id, code, message))

        def publish() -> None:
            self.book.ids.release(self.id)  # after the record: a retry of the id starts afresh
            self.events.event(failure, on_ack=self.book.ack_recorder(self.id))

        self.book.writer.write(lambda journal: journal.record_failed(self.id, failure), publish)

    def turned_away(self, code: str, message: str) -> None:
        """Journaled but not queued (the queue was full): the sender is told, nothing runs."""
        self.book.writer.write(self._forget)
        self.book.ids.release(self.id)
        self.book.refuse(self.reply, self.id, code, message)

    def dropped(self, code: str, message: str) -> None:
        """Still queued at shutdown: refused, not kept (the sender resubmits, so the journal must
        not run it again)."""
        self.book.writer.write(self._forget)
        self.book.ids.release(self.id)
        log.info("job %s refused: [%s] %s", self.id, code, message)
        self.events.event(events.error(self.id, code, message))

    # --- helpers ---------------------------------------------------------------------------

    def _answer(self, done: dict[str, Any]) -> None:
        self.book.count(done=True)
        self._marked(done)
        self.book.results.put(self.id, done)

        def publish() -> None:
            self.book.ids.release(self.id)  # only now: a repeat of the id gets the stored answer
            self.events.event(done, on_ack=self.book.ack_recorder(self.id))

        self.book.writer.write(lambda journal: journal.record_done(self.id, done), publish)

    def _forget(self, journal: JobJournal) -> None:
        journal.forget(self.id)

    def _marked(self, event: dict[str, Any]) -> dict[str, Any]:
        if self.restarted:
            event["restarted"] = True
        return event

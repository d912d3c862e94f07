"""Intake: every message the agent receives, from paho's callback to the job queue.

paho's network thread only puts a message into a bounded FIFO (`submit`) and returns, so it is
always free to send running jobs' deltas and answer keepalives. One intake thread then does the
slow part in arrival order: JSON, the chat template and tokenizer, the duplicate check, the fsync'd
journal write that makes `accepted` a promise, and the queue. A cancel goes through the same FIFO,
so it always finds the job it follows.

When the FIFO is full (the intake is far behind: a flood, a stuck disk) a job is answered
`queue_full` at once, from what can be read of it cheaply, and logged; a cancel or update command
over the limit is logged and dropped (a flood of commands is not a device's to queue).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import events
from agent.errors import AgentError, JobError
from agent.job_queue import JobQueue, QueueFull, Reply, ResultStore
from agent.jobs import (
    JOB_ID_RE,
    InvalidPayload,
    JobRequest,
    RequestLimits,
    parse_cancel,
    parse_job,
)
from agent.journal import JobJournal, JournalError
from agent.lifecycle import ActiveIds, ActiveJob, JobBook
from agent.mqtt_link import Incoming
from agent.outbox import JobStream
from agent.runtime import LoadedModel
from agent.topics import INVALID_JOB_ID, Topics

log = logging.getLogger(__name__)

INTAKE_CAPACITY = 1024  # messages waiting for the intake thread; beyond it jobs get queue_full
REFUSALS_LOGGED = 20  # refusals logged per window; a flood is summed up, not logged line by line
REFUSAL_LOG_WINDOW_S = 10.0
_ID_PEEK_BYTES = 65536  # an overflowing job is read for its id only when it is this small


@dataclass
class Serving:
    """What the intake needs to know of the device's state at each message."""

    model: Callable[[], LoadedModel | None]
    generation: Callable[[], int]
    accepting: Callable[[], bool]
    problem: Callable[[], AgentError | None]


def encode_request(request: JobRequest, model: LoadedModel) -> list[int]:
    """The prompt ids of `request` for `model`, or a JobError saying why there are none."""
    if request.messages is not None:
        ids = model.codec.encode_messages(request.message_dicts())
    else:
        ids = model.codec.encode_prompt(request.prompt or "")
    context = model.backend.info.max_seq_len
    if not ids:
        raise JobError("invalid_request", "the prompt is empty once tokenized")
    if len(ids) >= context:
        raise JobError(
            "prompt_too_long",
            f"the prompt is {len(ids)} tokens; this model holds {context} tokens of context "
            "including the answer",
        )
    return ids


class Intake:
    def __init__(
        self,
        *,
        topics: Topics,
        limits: RequestLimits,
        queue: JobQueue[ActiveJob],
        book: JobBook,
        journal: JobJournal | None,
        serving: Serving,
        stream: Callable[[str, Reply], JobStream],
        refuse_payload: Callable[[Reply, dict[str, Any]], None],
        on_update: Callable[[Incoming], None] | None,
        journal_failed: Callable[[JournalError], None],
        journal_ok: Callable[[], None],
        capacity: int = INTAKE_CAPACITY,
    ) -> None:
        self.topics = topics
        self.limits = limits
        self.queue = queue
        self.book = book
        self.ids: ActiveIds = book.ids
        self.results: ResultStore = book.results
        self.journal = journal
        self.serving = serving
        self._stream = stream
        self._refuse_payload = refuse_payload
        self._on_update = on_update
        self._journal_failed = journal_failed
        self._journal_ok = journal_ok
        self.capacity = capacity
        self.refusal_log = _LogBudget(REFUSALS_LOGGED, REFUSAL_LOG_WINDOW_S)
        self._waiting: deque[tuple[Incoming, bool]] = deque()  # (message, is it a job)
        self._jobs_waiting = 0
        self._commands_waiting = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edge-agent-intake", daemon=True)

    # --- paho's thread: enqueue only -------------------------------------------------------

    def submit(self, message: Incoming) -> None:
        is_job = message.topic not in (self.topics.cancel, self.topics.ota)
        with self._cond:
            waiting = self._jobs_waiting if is_job else self._commands_waiting
            full = waiting >= self.capacity
            if not full:
                self._waiting.append((message, is_job))
                if is_job:
                    self._jobs_waiting += 1
                else:
                    self._commands_waiting += 1
                self._cond.notify()
        if full:
            self._overflow(message, is_job)

    def _overflow(self, message: Incoming, is_job: bool) -> None:
        if not is_job:
            if self.refusal_log.allow():
                log.warning("intake full: a message on %s was dropped", message.topic)
            return
        job_id = _peek_id(message.payload)
        target = self._reply_for(message) or Reply(self.topics.results(job_id or INVALID_JOB_ID))
        self.send_error(
            target,
            job_id,
            "queue_full",
            f"{self.capacity} messages are waiting to be read; retry later or on another device",
        )

    # --- the intake thread -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the messages already waiting (they are answered, if only `shutting_down`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                message, is_job = self._waiting.popleft()
                if is_job:
                    self._jobs_waiting -= 1
                else:
                    self._commands_waiting -= 1
            try:
                self.handle(message)
            except Exception:  # the intake thread must outlive any one message
                log.exception("unexpected failure handling a message on %s", message.topic)

    def handle(self, message: Incoming) -> None:
        if message.topic == self.topics.cancel:
            self._handle_cancel(message)  # parse_cancel refuses an oversize one before parsing
        elif message.topic == self.topics.ota:
            if self._on_update is not None:
                self._on_update(message)
        else:
            self._handle_job(message)  # parse_job checks jobs.max_payload_bytes first

    def _handle_job(self, message: Incoming) -> None:
        try:
            self._handle_job_checked(message)
        except Exception as exc:  # a bug must still answer the job, never drop it silently
            log.exception("unexpected failure handling a job")
            target = self._reply_for(message) or Reply(self.topics.results(INVALID_JOB_ID))
            self.send_error(target, None, "engine_error", f"{type(exc).__name__}: {exc}")

    def _handle_job_checked(self, message: Incoming) -> None:
        reply = self._reply_for(message)
        try:
            request = parse_job(message.payload, self.limits)
        except InvalidPayload as exc:
            job_id = exc.job_id
            target = reply or Reply(self.topics.results(job_id or INVALID_JOB_ID))
            self.send_error(target, job_id, exc.job_code, exc.message)
            return
        if reply is None and message.response_topic is not None:
            self._refuse_reply_topic(request, message.response_topic)
            return
        reply = reply or Reply(self.topics.results(request.id))
        self._admit(request, reply, message.payload, message.redelivered)

    def _refuse_reply_topic(self, request: JobRequest, topic: str) -> None:
        if self.topics.reply_reserved(topic):
            reason = (
                "it is a command or report topic of the fleet, never a reply topic ("
                f"{', '.join(self.topics.reserved_replies)}, `$`-topics); "
            )
        else:
            reason = ""
        reason += (
            f"this device answers only on topics matching "
            f"{', '.join(self.topics.allowed_replies)} (not those), such as "
            f"{self.topics.results(request.id)}"
        )
        self.send_error(
            Reply(self.topics.results(request.id)),
            request.id,
            "invalid_request",
            f"the Response Topic {topic[:200]!r} is not allowed: {reason}",
        )

    def _reply_for(self, message: Incoming) -> Reply | None:
        topic = message.response_topic
        if topic is None or not self.topics.reply_allowed(topic):
            return None
        return Reply(topic, message.correlation_data)

    def _admit(self, request: JobRequest, reply: Reply, payload: bytes, redelivered: bool) -> None:
        job_id = request.id
        model = self.serving.model()
        accepting = self.serving.accepting()
        with self.ids.lock:  # the check and the claim are one step (see ActiveIds)
            active = self.ids.is_active(job_id)
            stored = None if active else self.results.get(job_id) or self._journal_answer(job_id)
            claimed = not active and stored is None and accepting and model is not None
            if claimed:
                self.ids.claim(job_id)
        if stored is not None:
            self._refuse_payload(reply, stored)  # the stored answer; a flood may lose some
            return
        if not accepting:
            self.send_error(reply, job_id, "shutting_down", "the agent is shutting down")
            return
        if model is None:
            problem = self.serving.problem()
            reason = problem.message if problem else "no bundle is loaded"
            self.send_error(
                reply, job_id, "engine_error", f"this device has no working model: {reason}"
            )
            return
        if active:
            if redelivered:  # the transport's at-least-once: the job's one answer will follow
                log.info("job %s delivered again by the broker while active: ignored", job_id)
                return
            self.send_error(
                reply, job_id, "duplicate", f"job {job_id!r} is already queued or running"
            )
            return
        try:
            self._accept(request, reply, payload, model)
        except BaseException:
            self.ids.release(job_id)
            raise

    def _accept(
        self, request: JobRequest, reply: Reply, payload: bytes, model: LoadedModel
    ) -> None:
        """Encode, journal and queue a claimed id; every refusal here releases the claim."""
        generation = self.serving.generation()
        try:
            prompt_ids = encode_request(request, model)
        except JobError as exc:
            self.ids.release(request.id)
            self.send_error(reply, request.id, exc.job_code, exc.message)
            return
        job = ActiveJob(
            self.book, request, prompt_ids, reply, self._stream(request.id, reply), generation
        )
        if self.journal is not None:
            try:  # journaled before `accepted` is sent: an accepted job survives a crash
                self.journal.record_accepted(
                    request.id, payload, reply.topic, reply.correlation_data, time.time()
                )
            except JournalError as exc:
                self._journal_failed(exc)
                self.ids.release(request.id)
                self.send_error(reply, request.id, "engine_error", exc.message)
                return
            self._journal_ok()
        try:
            self.queue.put(job, job.accepted)
        except QueueFull:
            job.turned_away(
                "queue_full",
                f"{self.queue.capacity} jobs are already waiting; retry later or on another device",
            )

    def _journal_answer(self, job_id: str) -> dict[str, Any] | None:
        if self.journal is None:
            return None
        try:
            answer = self.journal.stored_answer(job_id)
        except JournalError as exc:
            self._journal_failed(exc)
            return None
        # Only a `done` is an answer to repeat; after an engine_error the same id may be retried.
        return answer if answer is not None and answer.get("event") == "done" else None

    def _handle_cancel(self, message: Incoming) -> None:
        try:
            job_id = parse_cancel(message.payload)
        except InvalidPayload as exc:
            target = self._reply_for(message) or Reply(self.topics.results(INVALID_JOB_ID))
            self.send_error(target, None, exc.job_code, exc.message)
            return
        queued = self.queue.remove(job_id)
        if queued is not None:
            model = self.serving.model()
            queued.finished_unstarted("cancelled", model.engine_info if model else None)
            return
        running = self.ids.running(job_id)
        if running is not None:
            running.cancel_requested.set()
        else:
            log.info("cancel for %s: not queued or running (already answered?)", job_id)

    def send_error(self, reply: Reply, job_id: str | None, code: str, message: str) -> None:
        if self.refusal_log.allow():
            log.info("job %s refused: [%s] %s", job_id, code, message)
        self._refuse_payload(reply, events.error(job_id, code, message))


def _peek_id(payload: bytes) -> str | None:
    """The `id` of a job payload, if it is small and readable (for a refusal's topic)."""
    if len(payload) > _ID_PEEK_BYTES:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    job_id = data.get("id") if isinstance(data, dict) else None
    if isinstance(job_id, str) and JOB_ID_RE.match(job_id) and job_id.isascii():
        return job_id
    return None


class _LogBudget:
    """At most `count` log lines per `window_s`; the rest are counted and summed up."""

    def __init__(self, count: int, window_s: float) -> None:
        self._count = count
        self._window_s = window_s
        self._started = 0.0
        self._used = 0
        self._suppressed = 0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._started >= self._window_s:
                if self._suppressed:
                    log.warning(
                        "%d more refusals in the last %.0f s were not logged", self._suppressed,
                        now - self._started,
                    )  # fmt: skip
                self._started, self._used, self._suppressed = now, 0, 0
            if self._used < self._count:
                self._used += 1
                return True
            self._suppressed += 1
            return False

"""The agent service: takes jobs from MQTT, runs them one at a time on the backend, answers.

Threads: paho's network thread validates each message and queues it (never blocks on the model);
one worker thread runs the generation loop; the main thread waits for SIGTERM and shuts down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from agent import __version__, events
from agent.batching import BatchGenerator
from agent.config import AgentConfig
from agent.errors import AgentError, JobError
from agent.generation import FinishReason, GenerationRequest, GenerationResult, SequenceRun
from agent.job_queue import Job, JobQueue, QueueFull, Reply, ResultStore
from agent.jobs import (
    MAX_OTA_COMMAND_BYTES,
    InvalidPayload,
    JobRequest,
    RequestLimits,
    parse_cancel,
    parse_job,
)
from agent.journal import JobJournal, JournalError
from agent.mqtt_link import Incoming, MqttLink, Subscription
from agent.ota.command import parse_update_command
from agent.ota.errors import OtaError
from agent.ota.installer import OtaHooks, OtaInstaller
from agent.ota.probation import ProbationGuard
from agent.outbox import JobStream, OnAck
from agent.runtime import LoadedModel
from agent.sdnotify import Watchdog
from agent.telemetry import TelemetryCollector, TelemetryPublisher
from agent.topics import INVALID_JOB_ID, Topics

log = logging.getLogger(__name__)


class AgentService:
    def __init__(
        self,
        config: AgentConfig,
        model: LoadedModel | None,
        *,
        problem: AgentError | None = None,
        probation: ProbationGuard | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        """`model` None means degraded: the device stays reachable (status `degraded` with
        `problem`, so an operator can see why and send a fix) but takes no fleet jobs and answers
        its own jobs with `engine_error`."""
        self.config = config
        self.model = model
        self.problem = problem
        self.engine_info = model.engine_info if model is not None else None
        self.topics = Topics(config.mqtt.prefix, config.device_id, config.mqtt.reply_topics)
        self.limits = RequestLimits(
            max_payload_bytes=config.jobs.max_payload_bytes,
            max_tokens_limit=config.jobs.max_tokens_limit,
            default_max_tokens=config.jobs.default_max_tokens,
        )
        self.queue = JobQueue(config.jobs.queue_size)
        self.results = ResultStore(config.jobs.results_kept)
        self._watchdog = watchdog
        self._done_count = 0
        self._failed_count = 0
        self.journal, self._journal_problem = _open_journal(config)
        self.telemetry = TelemetryCollector(config.telemetry)
        self._publisher = TelemetryPublisher(
            config.telemetry.interval_s,
            self._telemetry_payload,
            lambda payload: self.link.publish(self.topics.telemetry, payload, qos=0),
        )
        self._metrics: Any = None
        # One registry of active ids, under one lock, from admission until the answer is stored
        # (`results` and the journal): an id is active, or answered, or unknown, never in between
        # (a job between the queue and the batch, or just finished, is still active).
        self._active: set[str] = set()
        self._running: dict[str, Job] = {}  # the active jobs that have started
        self._running_lock = threading.Lock()
        self._refusal_log = _LogBudget(REFUSALS_LOGGED, REFUSAL_LOG_WINDOW_S)
        # An OTA switch hands the new model to the worker, which swaps it in once the running
        # batch has drained: running jobs finish on the old model, queued ones wait, none fail.
        self._pending_model: LoadedModel | None = None
        self._swapped = threading.Event()
        self._updating = False
        self.ota: OtaInstaller | None = None
        if config.ota.enabled:
            self.ota = OtaInstaller(
                config.state_dir,
                config.ota,
                config.runtime,
                OtaHooks(
                    publish_status=self._publish_ota_status,
                    set_updating=self._set_updating,
                    activate=self.activate,
                ),
                probation or ProbationGuard(config.state_dir, 3, 600.0),
            )
        self._accepting = True
        self._stop_worker = threading.Event()
        self._since = events.utc_now_iso()
        self._worker = threading.Thread(target=self._work, name="edge-agent-worker", daemon=True)
        self.link = MqttLink(
            config.mqtt,
            client_id=f"edge-agent-{config.device_id}",
            will_topic=self.topics.status,
            will_payload=self._status("offline"),
            subscriptions=[
                Subscription(self.topics.jobs),
                Subscription(self.topics.cancel),
                *([Subscription(self.topics.ota)] if config.ota.enabled else []),
                # Without a working model we must not take jobs meant for any healthy device.
                *([Subscription(self.topics.fleet_jobs_shared)] if model is not None else []),
            ],
            on_message=self.handle_message,
            on_connected=self._publish_online,
        )

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._republish_unacked()
        self._requeue_journaled()
        self._worker.start()
        self.link.start()
        if self.ota is not None:
            self.ota.resume()
        self.telemetry.start(wait_s=2.0)
        self._publisher.start()
        if self.config.telemetry.metrics_port:
            from agent.telemetry.metrics import start_metrics_server

            self._metrics = start_metrics_server(
                self.config.telemetry.metrics_port,
                self.telemetry,
                self.config.telemetry.metrics_addr,
            )

    def _republish_unacked(self) -> None:
        """Answers journaled but never acknowledged by the broker (the agent died, or lost the
        broker, with them in its memory) are published again: the sender gets its answer
        without asking twice. A client may see such an answer twice; it is the same answer."""
        if self.journal is None:
            return
        try:
            unacked = self.journal.unacked_answers()
        except JournalError as exc:
            self._journal_failed(exc)
            return
        for entry in unacked:
            stream = self._job_stream(
                entry.job_id, Reply(entry.reply_topic, entry.correlation_data)
            )
            stream.event(entry.answer, on_ack=self._ack_recorder(entry.job_id))
            log.info("publishing again the undelivered answer of job %s", entry.job_id)

    def _requeue_journaled(self) -> None:
        """Jobs accepted before a crash or reboot but never answered run again; their events
        say `"restarted": true` (the client saw their start, and will see it again)."""
        if self.journal is None or self.model is None:
            return
        for entry in self.journal.unfinished():
            reply = Reply(entry.reply_topic, entry.correlation_data)
            if entry.attempts >= MAX_ATTEMPTS:
                message = f"this job was running when the agent stopped {entry.attempts} times"
                failure = events.error(entry.job_id, "engine_error", message)
                self._record(partial(self._journal_call, "record_failed", entry.job_id, failure))
                log.info("job %s refused: [engine_error] %s", entry.job_id, message)
                stream = self._job_stream(entry.job_id, reply)
                stream.event(failure, on_ack=self._ack_recorder(entry.job_id))
                continue
            try:
                request = parse_job(entry.request_payload, self.limits)
                prompt_ids = self._encode(request, self.model)
            except JobError as exc:  # cannot happen for a job accepted by the same rules
                self._send_error(reply, entry.job_id, exc.job_code, exc.message)
                continue
            waited = max(0.0, time.time() - entry.received_at)
            stream = self._job_stream(request.id, reply, restarted=True)
            job = Job(
                request,
                prompt_ids,
                reply,
                stream,
                received=time.monotonic() - waited,
                restarted=True,
            )
            with self._running_lock:
                self._active.add(job.id)
            self.queue.put(job, partial(self._announce, job), force=True)
            log.info("re-running journaled job %s (accepted %.0f s ago)", entry.job_id, waited)

    def activate(self, model: LoadedModel) -> None:
        """Serve `model` from the next batch on (called by the OTA installer; blocks until the
        worker has swapped it in)."""
        self._swapped.clear()
        self._pending_model = model
        self._swapped.wait()

    def _swap_model(self) -> None:
        old, self.model = self.model, self._pending_model
        assert self.model is not None
        self.engine_info = self.model.engine_info
        self.problem = None
        self._pending_model = None
        if old is not None and old is not self.model:
            old.backend.close()
        log.info("now serving %s", self.engine_info)
        self._publish_online()
        self._swapped.set()

    def shutdown(self, grace_s: float = 60.0) -> None:
        """Stop taking jobs, let the running one finish, refuse the queued ones, go offline."""
        log.info("shutting down")
        self._accepting = False
        # Our broker session outlives us (device jobs wait for our return), but the fleet's jobs
        # must go to devices that are up: leave the shared subscription before disconnecting.
        self.link.unsubscribe(self.topics.fleet_jobs_shared)
        self.queue.close()
        for job in self.queue.drain():
            # Refused, not kept: the sender resubmits, so the journal must not run it again.
            self._record(partial(self._journal_forget, job.id))
            self._release(job.id)
            log.info("job %s refused: [shutting_down] the agent is shutting down", job.id)
            job.events.event(events.error(job.id, "shutting_down", "the agent is shutting down"))
        self._stop_worker.set()
        self._worker.join(grace_s)
        with self._running_lock:
            running = list(self._running.values())
        for job in running:  # past the grace period: stop them and still answer them
            job.cancel_requested.set()
        self._worker.join(10)
        self._publisher.stop()
        if self._metrics is not None:
            self._metrics.close()
        self.telemetry.stop()
        if self.link.connected:  # the answers still waiting go out before `offline`
            self.link.flush(timeout=5)
        self.link.publish_and_wait(self.topics.status, self._status("offline"), timeout=5)
        self.link.stop()
        if self.journal is not None:
            self.journal.close()

    # --- incoming messages (paho's network thread) -----------------------------------------

    def handle_message(self, message: Incoming) -> None:
        if message.topic == self.topics.cancel:
            self._handle_cancel(message)  # parse_cancel refuses an oversize one before parsing
        elif message.topic == self.topics.ota:
            if len(message.payload) > MAX_OTA_COMMAND_BYTES:
                self._refuse_oversize_ota(len(message.payload))
            else:
                self._handle_ota(message)
        else:
            self._handle_job(message)  # parse_job checks jobs.max_payload_bytes first

    def _refuse_oversize_ota(self, size: int) -> None:
        message = (
            f"update command: the payload is {size} bytes; the limit is {MAX_OTA_COMMAND_BYTES} "
            '(a command is {"id", "url", "sha256", "size", "version"}: the bundle is downloaded '
            "from `url`, never sent over MQTT)"
        )
        if self._refusal_log.allow():
            log.warning("refused an update command: %s", message)
        self._publish_ota_status(
            {"id": None, "state": "failed", "version": None, "progress": 0.0,
             "error": {"code": "bad_command", "message": message}}
        )  # fmt: skip

    def _handle_ota(self, message: Incoming) -> None:
        if self.ota is None:
            return
        try:
            command = parse_update_command(message.payload, self.config.ota.max_bundle_bytes)
        except OtaError as exc:
            log.warning("refused an update command: %s", exc)
            self._publish_ota_status(
                {"id": None, "state": "failed", "version": None, "progress": 0.0,
                 "error": {"code": exc.code, "message": exc.message}}
            )  # fmt: skip
            return
        self.ota.submit(command)

    def _handle_job(self, message: Incoming) -> None:
        try:
            self._handle_job_checked(message)
        except Exception as exc:  # a bug must still answer the job, never drop it silently
            log.exception("unexpected failure handling a job")
            target = self._reply_for(message) or Reply(self.topics.results(INVALID_JOB_ID))
            self._send_error(target, None, "engine_error", f"{type(exc).__name__}: {exc}")

    def _handle_job_checked(self, message: Incoming) -> None:
        reply = self._reply_for(message)
        try:
            request = parse_job(message.payload, self.limits)
        except InvalidPayload as exc:
            job_id = exc.job_id
            target = reply or Reply(self.topics.results(job_id or INVALID_JOB_ID))
            self._send_error(target, job_id, exc.job_code, exc.message)
            return
        if reply is None and message.response_topic is not None:
            topic = message.response_topic
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
            self._send_error(
                Reply(self.topics.results(request.id)),
                request.id,
                "invalid_request",
                f"the Response Topic {topic[:200]!r} is not allowed: {reason}",
            )
            return
        reply = reply or Reply(self.topics.results(request.id))
        self._admit(request, reply, message.payload, message.redelivered)

    def _reply_for(self, message: Incoming) -> Reply | None:
        topic = message.response_topic
        if topic is None or not self.topics.reply_allowed(topic):
            return None
        return Reply(topic, message.correlation_data)

    def _admit(
        self, request: JobRequest, reply: Reply, payload: bytes, redelivered: bool = False
    ) -> None:
        job_id = request.id
        with self._running_lock:  # the check and the claim are one step (see `_active`)
            active = job_id in self._active
            stored = None if active else self.results.get(job_id) or self._journal_answer(job_id)
            claimed = not active and stored is None and self._accepting and self.model is not None
            if claimed:
                self._active.add(job_id)
        if stored is not None:
            self._refuse(reply, stored)  # the stored answer; a flood of repeats may lose some
            return
        if not self._accepting:
            self._send_error(reply, job_id, "shutting_down", "the agent is shutting down")
            return
        if self.model is None:
            reason = self.problem.message if self.problem else "no bundle is loaded"
            self._send_error(
                reply, job_id, "engine_error", f"this device has no working model: {reason}"
            )
            return
        if active:
            if redelivered:  # the transport's at-least-once: the job's one answer will follow
                log.info("job %s delivered again by the broker while active: ignored", job_id)
                return
            self._send_error(
                reply, job_id, "duplicate", f"job {job_id!r} is already queued or running"
            )
            return
        try:
            self._accept(request, reply, payload)
        except BaseException:
            self._release(job_id)
            raise

    def _accept(self, request: JobRequest, reply: Reply, payload: bytes) -> None:
        """Encode, journal and queue a claimed id; every refusal here releases the claim."""
        assert self.model is not None
        try:
            prompt_ids = self._encode(request, self.model)
        except JobError as exc:
            self._release(request.id)
            self._send_error(reply, request.id, exc.job_code, exc.message)
            return
        job = Job(request, prompt_ids, reply, self._job_stream(request.id, reply))
        if self.journal is not None:
            try:  # journaled before `accepted` is sent: an accepted job survives a crash
                self.journal.record_accepted(
                    request.id, payload, reply.topic, reply.correlation_data, time.time()
                )
            except JournalError as exc:
                self._journal_failed(exc)
                self._release(request.id)
                self._send_error(reply, request.id, "engine_error", exc.message)
                return
            self._journal_recovered()
        try:
            self.queue.put(job, partial(self._announce, job))
        except QueueFull:
            self._record(lambda: self._journal_forget(request.id))
            self._release(request.id)
            self._send_error(
                reply,
                request.id,
                "queue_full",
                f"{self.queue.capacity} jobs are already waiting; retry later or on another device",
            )

    def _encode(self, request: JobRequest, model: LoadedModel) -> list[int]:
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

    def _release(self, job_id: str) -> None:
        """The id is no longer active: answered (and stored), or refused after its claim."""
        with self._running_lock:
            self._active.discard(job_id)
            self._running.pop(job_id, None)

    def _announce(self, job: Job, position: int) -> None:
        job.events.event(_marked(job, events.accepted(job.id, position)))

    def _handle_cancel(self, message: Incoming) -> None:
        try:
            job_id = parse_cancel(message.payload)
        except InvalidPayload as exc:
            target = self._reply_for(message) or Reply(self.topics.results(INVALID_JOB_ID))
            self._send_error(target, None, exc.job_code, exc.message)
            return
        queued = self.queue.remove(job_id)
        if queued is not None:
            self._finish_unstarted(queued, "cancelled")
            return
        with self._running_lock:
            running = self._running.get(job_id)
        if running is not None:
            running.cancel_requested.set()
        else:
            log.info("cancel for %s: not queued or running (already answered?)", job_id)

    # --- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        """Continuous batching: admit queued jobs into free batch slots, step the batch, repeat.
        On shutdown, no new job is admitted and the running ones finish."""
        batch: BatchGenerator | None = None
        while not self._stop_worker.is_set() or (batch is not None and not batch.idle):
            if self._watchdog is not None:
                self._watchdog.beat()
            if self._pending_model is not None and (batch is None or batch.idle):
                self._swap_model()
                batch = None
            model = self.model
            if model is None:  # degraded: nothing is ever queued
                self._stop_worker.wait(0.5)
                continue
            if batch is None:
                limit = model.backend.info.max_batch or self.config.jobs.max_batch
                rows = min(limit, self.config.jobs.max_batch)
                batch = BatchGenerator(model.backend, rows, self.config.jobs.prefill_chunk)
            admitting = self._pending_model is None and not self._stop_worker.is_set()
            while admitting and batch.free_slots > 0:
                job = self.queue.get(timeout=0.5 if batch.idle else 0.0)
                if job is None:
                    break
                self._start(job, batch, model)
            if not batch.idle:
                batch.step()

    def _start(self, job: Job, batch: BatchGenerator, model: LoadedModel) -> None:
        started = time.monotonic()
        if job.deadline_passed(started):
            self._finish_unstarted(job, "deadline")
            return
        stream = job.events
        on_text: Callable[[str], None] = stream.delta if job.request.stream else _ignore

        def interrupt() -> FinishReason | None:
            if self._watchdog is not None:
                self._watchdog.beat()  # once per token: a hung decode step stops the beats
            if job.cancel_requested.is_set():
                return "cancelled"
            if job.deadline_passed():
                return "deadline"
            return None

        def on_finished(
            run: SequenceRun, result: GenerationResult | None, error: AgentError | None
        ) -> None:
            if result is None:
                message = error.message if error is not None else "unknown failure"
                log.error("job %s failed: %s", job.id, message)
                self._failed_count += 1
                failure = _marked(job, events.error(job.id, "engine_error", message))
                self._record(lambda: self._journal_call("record_failed", job.id, failure))
                self._release(job.id)
                stream.event(failure, on_ack=self._ack_recorder(job.id))
                return
            done = events.done_from_result(
                job.id,
                result,
                queue_ms=(started - job.received) * 1000,
                total_ms=(time.monotonic() - job.received) * 1000,
                engine=model.engine_info,
                device=self.config.device_id,
            )
            if result.completion_tokens:
                self.telemetry.record_job(
                    result.ttft_s * 1000,
                    result.completion_tokens - 1,
                    result.total_s - result.ttft_s,
                )
            energy = self.telemetry.job_energy(started, time.monotonic(), result.completion_tokens)
            if energy is not None:  # only where the hardware reports its power rails
                done["energy"] = energy.to_event()
            self._done_count += 1
            _marked(job, done)
            self._record(lambda: self._journal_call("record_done", job.id, done))
            self.results.put(job.id, done)
            self._release(job.id)  # only now: a repeat of the id gets the stored answer
            stream.event(done, on_ack=self._ack_recorder(job.id))

        self._record(lambda: self._journal_call("record_started", job.id))
        request = GenerationRequest(
            prompt_ids=job.prompt_ids,
            max_tokens=job.request.max_tokens,
            sampling=job.request.sampling,
            stop=job.request.stop,
        )
        run = SequenceRun(
            request,
            model.codec,
            model.backend.info.max_seq_len,
            on_text=on_text,
            interrupt=interrupt,
        )
        with self._running_lock:
            self._running[job.id] = job
        batch.submit(run, on_finished)

    def _finish_unstarted(self, job: Job, reason: FinishReason) -> None:
        waited = (time.monotonic() - job.received) * 1000
        done = events.done(
            job.id,
            text="",
            finish_reason=reason,
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=0,
            queue_ms=waited,
            ttft_ms=0.0,
            total_ms=waited,
            tokens_per_s=0.0,
            engine=self.engine_info,
            device=self.config.device_id,
        )
        _marked(job, done)
        self._record(lambda: self._journal_call("record_done", job.id, done))
        self.results.put(job.id, done)
        self._release(job.id)
        job.events.event(done, on_ack=self._ack_recorder(job.id))

    # --- publishing ------------------------------------------------------------------------

    def _job_stream(self, job_id: str, reply: Reply, *, restarted: bool = False) -> JobStream:
        make_delta = _restarted_delta(job_id) if restarted else partial(events.delta, job_id)
        return self.link.stream(reply.topic, reply.correlation_data, make_delta)

    def _ack_recorder(self, job_id: str) -> OnAck | None:
        """Journals that the broker has the job's final event (else it is sent again at start)."""
        if self.journal is None:
            return None
        return lambda: self._record(lambda: self._journal_call("record_acked", job_id))

    def _refuse(self, reply: Reply, payload: dict[str, Any]) -> None:
        """A reply to a request that was not accepted: bounded, may be dropped under a flood."""
        self.link.refuse(reply.topic, payload, reply.correlation_data)

    def _send_error(self, reply: Reply, job_id: str | None, code: str, message: str) -> None:
        if self._refusal_log.allow():
            log.info("job %s refused: [%s] %s", job_id, code, message)
        self._refuse(reply, events.error(job_id, code, message))

    def _status(self, state: str) -> dict[str, Any]:
        status = events.status(state, __version__, self.engine_info, self._since)
        problem = self.problem or self._journal_problem
        if problem is not None:
            status["error"] = {"code": problem.code, "message": problem.message}
        return status

    def _publish_online(self) -> None:
        state = "degraded" if self.model is None else "updating" if self._updating else "online"
        self.link.publish(self.topics.status, self._status(state), retain=True)

    def _set_updating(self, updating: bool) -> None:
        self._updating = updating
        self._publish_online()

    def _publish_ota_status(self, payload: dict[str, Any], retain: bool = True) -> None:
        self.link.publish(self.topics.ota_status, payload, retain=retain)

    # --- the journal and telemetry ---------------------------------------------------------

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

    def _journal_call(self, method: str, *args: Any) -> None:
        if self.journal is not None:
            getattr(self.journal, method)(*args)

    def _journal_forget(self, job_id: str) -> None:
        self._journal_call("forget", job_id)

    def _record(self, write: Callable[[], None]) -> None:
        """A journal write after the job was accepted: a failure is reported, the job goes on."""
        try:
            write()
        except JournalError as exc:
            self._journal_failed(exc)
        else:
            self._journal_recovered()

    def _journal_recovered(self) -> None:
        """A write succeeded again (space was freed): clear a write error from the status."""
        problem = self._journal_problem
        if problem is not None and self.journal is not None and self.journal.recovered is None:
            self._journal_problem = None
            log.info("job journal writes again")
            self._publish_online()

    def _journal_failed(self, exc: JournalError) -> None:
        if self._journal_problem is None or self._journal_problem.message != exc.message:
            log.error("job journal: %s", exc)
            self._journal_problem = exc
            self._publish_online()

    def purge_journal(self) -> None:
        self._record(lambda: self._journal_call("purge_expired"))

    def _telemetry_payload(self) -> dict[str, Any]:
        with self._running_lock:
            running = len(self._running)
        jobs = {
            "queued": len(self.queue),
            "running": running,
            "done": self._done_count,
            "failed": self._failed_count,
        }
        return self.telemetry.snapshot(jobs, self.engine_info, self.config.device_id)


MAX_ATTEMPTS = 3  # a job that was running at 3 crashes is not run a 4th time
REFUSALS_LOGGED = 20  # refusals logged per window; a flood is summed up, not logged line by line
REFUSAL_LOG_WINDOW_S = 10.0


def _ignore(text: str) -> None:
    pass


def _marked(job: Job, event: dict[str, Any]) -> dict[str, Any]:
    if job.restarted:
        event["restarted"] = True
    return event


def _restarted_delta(job_id: str) -> Callable[[int, str], dict[str, Any]]:
    def make(seq: int, text: str) -> dict[str, Any]:
        return {**events.delta(job_id, seq, text), "restarted": True}

    return make


class _LogBudget:
    """At most `count` log lines per `window_s`; the rest are counted and summed up."""

    def __init__(self, count: int, window_s: float) -> None:
        self._count = count
        self._window_s = window_s
        self._started = 0.0
        self._used = 0
        self._suppressed = 0

    def allow(self) -> bool:
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


def _open_journal(config: AgentConfig) -> tuple[JobJournal | None, JournalError | None]:
    """The job journal, or why there is none (reported in the status; jobs are still taken)."""
    try:
        journal = JobJournal.in_state_dir(config.state_dir, config.jobs.retention_s)
    except JournalError as exc:
        log.error("job journal unavailable, accepted jobs will not survive a restart: %s", exc)
        return None, exc
    recovered = journal.recovered.as_error() if journal.recovered is not None else None
    if recovered is not None:
        log.error("job journal: %s", recovered)
    return journal, recovered

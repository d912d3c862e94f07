"""The agent service: the composition root that wires a job's path together, and the device's
status.

How a job flows (README, "How a job flows"):
  paho's network thread -> `Intake.submit` (a bounded FIFO, nothing else)
  intake thread -> `agent.intake`: parse, dedupe, encode, journal `accepted`, `JobQueue`
  worker thread -> `agent.worker`: batch slots, `BatchGenerator.step`, each step's report applied
  every transition -> `agent.lifecycle.ActiveJob`: journal (through `JournalWriter`), publish
  (through the outbox in `MqttLink`), count
The main thread waits for SIGTERM and calls `shutdown`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from agent import __version__, events
from agent.config import AgentConfig
from agent.errors import AgentError, JobError
from agent.intake import Intake, Serving, encode_request
from agent.job_queue import JobQueue, Reply, ResultStore
from agent.jobs import MAX_OTA_COMMAND_BYTES, RequestLimits, parse_job
from agent.journal import JobJournal, JournalError
from agent.journal_writer import JournalWriter
from agent.lifecycle import ActiveIds, ActiveJob, JobBook
from agent.mqtt_link import Incoming, MqttLink, Subscription
from agent.ota.command import parse_update_command
from agent.ota.errors import OtaError
from agent.ota.installer import OtaHooks, OtaInstaller
from agent.ota.probation import ProbationGuard
from agent.outbox import JobStream
from agent.runtime import LoadedModel
from agent.sdnotify import Watchdog
from agent.telemetry import TelemetryCollector, TelemetryPublisher
from agent.topics import Topics
from agent.worker import ServingModel, Worker

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job that was running at 3 crashes is not run a 4th time


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
        self.serving = ServingModel(model)
        self.problem = problem
        self.topics = Topics(config.mqtt.prefix, config.device_id, config.mqtt.reply_topics)
        self.queue: JobQueue[ActiveJob] = JobQueue(config.jobs.queue_size)
        self.journal, self._journal_problem = _open_journal(config)
        self.telemetry = TelemetryCollector(config.telemetry)
        self._publisher = TelemetryPublisher(
            config.telemetry.interval_s,
            self._telemetry_payload,
            lambda payload: self.link.publish(self.topics.telemetry, payload, qos=0),
        )
        self._metrics: Any = None
        self._accepting = True
        self._updating = False
        self._since = events.utc_now_iso()
        self.writer = JournalWriter(self.journal, self._journal_failed, self._journal_recovered)
        self.book = JobBook(
            ids=ActiveIds(),
            results=ResultStore(config.jobs.results_kept),
            writer=self.writer,
            telemetry=self.telemetry,
            device_id=config.device_id,
            refuse=self._send_error,
        )
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
        self.intake = Intake(
            topics=self.topics,
            limits=RequestLimits(
                max_payload_bytes=config.jobs.max_payload_bytes,
                max_tokens_limit=config.jobs.max_tokens_limit,
                default_max_tokens=config.jobs.default_max_tokens,
            ),
            queue=self.queue,
            book=self.book,
            journal=self.journal,
            serving=Serving(
                model=lambda: self.serving.model,
                generation=lambda: self.serving.generation,
                accepting=lambda: self._accepting,
                problem=lambda: self.problem,
            ),
            stream=self._job_stream,
            refuse_payload=self._refuse,
            on_update=self._handle_update if self.ota is not None else None,
            journal_failed=self._journal_failed,
            journal_ok=self._journal_recovered,
        )
        self.worker = Worker(
            self.queue,
            self.serving,
            config.jobs,
            watchdog=watchdog,
            on_swapped=self._swapped,
        )
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

    @property
    def model(self) -> LoadedModel | None:
        return self.serving.model

    @property
    def engine_info(self) -> dict[str, str] | None:
        model = self.serving.model
        return model.engine_info if model is not None else None

    @property
    def done_count(self) -> int:
        """Jobs answered `done` since start (each computed once)."""
        return self.book.done_count

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._republish_unacked()
        self._requeue_journaled()
        self.writer.start()
        self.intake.start()
        self.worker.start()
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
            stream.event(entry.answer, on_ack=self.book.ack_recorder(entry.job_id))
            log.info("publishing again the undelivered answer of job %s", entry.job_id)

    def _requeue_journaled(self) -> None:
        """Jobs accepted before a crash or reboot but never answered run again; their events
        say `"restarted": true` (the client saw their start, and will see it again)."""
        model = self.serving.model
        if self.journal is None or model is None:
            return
        for entry in self.journal.unfinished():
            reply = Reply(entry.reply_topic, entry.correlation_data)
            if entry.attempts >= MAX_ATTEMPTS:
                message = f"this job was running when the agent stopped {entry.attempts} times"
                failure = events.error(entry.job_id, "engine_error", message)
                log.info("job %s refused: [engine_error] %s", entry.job_id, message)
                self._answer_from_journal(entry.job_id, reply, failure)
                continue
            try:
                request = parse_job(entry.request_payload, self.intake.limits)
                prompt_ids = encode_request(request, model)
            except JobError as exc:  # cannot happen for a job accepted by the same rules
                self._send_error(reply, entry.job_id, exc.job_code, exc.message)
                continue
            waited = max(0.0, time.time() - entry.received_at)
            job = ActiveJob(
                self.book,
                request,
                prompt_ids,
                reply,
                self._job_stream(request.id, reply, restarted=True),
                self.serving.generation,
                received=time.monotonic() - waited,
                restarted=True,
            )
            with self.book.ids.lock:
                self.book.ids.claim(job.id)
            self.queue.put(job, job.accepted, force=True)
            log.info("re-running journaled job %s (accepted %.0f s ago)", entry.job_id, waited)

    def _answer_from_journal(self, job_id: str, reply: Reply, failure: dict[str, Any]) -> None:
        stream = self._job_stream(job_id, reply)

        def record(journal: JobJournal) -> None:
            journal.record_failed(job_id, failure)

        def publish() -> None:
            stream.event(failure, on_ack=self.book.ack_recorder(job_id))

        self.writer.write(record, publish)

    def activate(self, model: LoadedModel) -> None:
        """Serve `model` from the next batch on (called by the OTA installer; blocks until the
        worker has swapped it in)."""
        self.serving.hand_over(model)

    def _swapped(self, model: LoadedModel | None) -> None:
        self.problem = None
        log.info("now serving %s", self.engine_info)
        self._publish_online()

    def shutdown(self, grace_s: float = 60.0) -> None:
        """Stop taking jobs, let the running one finish, refuse the queued ones, go offline."""
        log.info("shutting down")
        self._accepting = False
        # Our broker session outlives us (device jobs wait for our return), but the fleet's jobs
        # must go to devices that are up: leave the shared subscription before disconnecting.
        self.link.unsubscribe(self.topics.fleet_jobs_shared)
        self.intake.close()
        self.queue.close()
        for job in self.queue.drain():
            job.dropped("shutting_down", "the agent is shutting down")
        self.worker.stopping.set()
        self.worker.join(grace_s)
        for job in self.book.ids.all_running():  # past the grace period: stop them, answer them
            job.cancel_requested.set()
        self.worker.join(10)
        self.writer.close()  # the journaled answers are published in its `then`
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

    # --- incoming messages (paho's network thread: enqueue only) ---------------------------

    def handle_message(self, message: Incoming) -> None:
        self.intake.submit(message)

    def _handle_update(self, message: Incoming) -> None:
        """An update command (on the intake thread): checked here, run by the OTA installer."""
        if self.ota is None:
            return
        if len(message.payload) > MAX_OTA_COMMAND_BYTES:
            text = (
                f"update command: the payload is {len(message.payload)} bytes; the limit is "
                f'{MAX_OTA_COMMAND_BYTES} (a command is {{"id", "url", "sha256", "size", '
                '"version"}: the bundle is downloaded from `url`, never sent over MQTT)'
            )
            if self.intake.refusal_log.allow():
                log.warning("refused an update command: %s", text)
            self._ota_failed("bad_command", text)
            return
        try:
            command = parse_update_command(message.payload, self.config.ota.max_bundle_bytes)
        except OtaError as exc:
            log.warning("refused an update command: %s", exc)
            self._ota_failed(exc.code, exc.message)
            return
        self.ota.submit(command)

    def _ota_failed(self, code: str, message: str) -> None:
        self._publish_ota_status(
            {"id": None, "state": "failed", "version": None, "progress": 0.0,
             "error": {"code": code, "message": message}}
        )  # fmt: skip

    # --- publishing ------------------------------------------------------------------------

    def _job_stream(self, job_id: str, reply: Reply, *, restarted: bool = False) -> JobStream:
        make_delta = _restarted_delta(job_id) if restarted else partial(events.delta, job_id)
        return self.link.stream(reply.topic, reply.correlation_data, make_delta)

    def _refuse(self, reply: Reply, payload: dict[str, Any]) -> None:
        """A reply to a request that was not accepted: bounded, may be dropped under a flood."""
        self.link.refuse(reply.topic, payload, reply.correlation_data)

    def _send_error(self, reply: Reply, job_id: str | None, code: str, message: str) -> None:
        self.intake.send_error(reply, job_id, code, message)

    def _status(self, state: str) -> dict[str, Any]:
        status = events.status(state, __version__, self.engine_info, self._since)
        problem = self.problem or self._journal_problem
        if problem is not None:
            status["error"] = {"code": problem.code, "message": problem.message}
        return status

    def _publish_online(self) -> None:
        model = self.serving.model
        state = "degraded" if model is None else "updating" if self._updating else "online"
        self.link.publish(self.topics.status, self._status(state), retain=True)

    def _set_updating(self, updating: bool) -> None:
        self._updating = updating
        self._publish_online()

    def _publish_ota_status(self, payload: dict[str, Any], retain: bool = True) -> None:
        self.link.publish(self.topics.ota_status, payload, retain=retain)

    # --- the journal's health and telemetry ------------------------------------------------

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
        def purge(journal: JobJournal) -> None:
            journal.purge_expired()

        self.writer.write(purge)

    def _telemetry_payload(self) -> dict[str, Any]:
        jobs = {
            "queued": len(self.queue),
            "running": len(self.book.ids.all_running()),
            "done": self.book.done_count,
            "failed": self.book.failed_count,
        }
        return self.telemetry.snapshot(jobs, self.engine_info, self.config.device_id)


def _restarted_delta(job_id: str) -> Callable[[int, str], dict[str, Any]]:
    def make(seq: int, text: str) -> dict[str, Any]:
        return {**events.delta(job_id, seq, text), "restarted": True}

    return make


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

"""The decode loop: queued jobs into free batch slots, one batch step, each step's outcome to its
jobs, repeat.

The batch says what a step did (`StepReport`); the loop turns it into the jobs' transitions here,
in one place. A fault stays with its job: a row that fails in the batch ends that job with
`engine_error`, a transition that fails (a publish, a telemetry reading) fails its job and takes its
row out; only a failed backend call, shared by the whole batch, fails every running job. The loop
itself survives anything: the systemd watchdog is for a hung device, not a bad job.

A model swap (an OTA switch) waits for the running batch to drain: running jobs finish on the old
model, queued ones wait and are encoded again for the new one if their tokenizer changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial

from agent.batching import BatchGenerator, StepReport
from agent.config import JobsConfig
from agent.errors import JobError
from agent.generation import FinishReason, GenerationRequest, SequenceRun
from agent.intake import encode_request
from agent.job_queue import JobQueue
from agent.lifecycle import ActiveJob
from agent.runtime import LoadedModel
from agent.sdnotify import Watchdog

log = logging.getLogger(__name__)


class ServingModel:
    """The model the device serves, and its generation (counted up at every swap)."""

    def __init__(self, model: LoadedModel | None) -> None:
        self.model = model
        self.generation = 0
        self._pending: LoadedModel | None = None
        self._swapped = threading.Event()

    @property
    def swap_waiting(self) -> bool:
        return self._pending is not None

    def hand_over(self, model: LoadedModel) -> None:
        """Serve `model` from the next batch on; blocks until the worker has swapped it in."""
        self._swapped.clear()
        self._pending = model
        self._swapped.wait()

    def swap(self) -> LoadedModel | None:
        """Make the waiting model the served one (the worker, between batches); the old one."""
        old, self.model = self.model, self._pending
        self._pending = None
        self.generation += 1
        return old

    def swapped(self) -> None:
        self._swapped.set()


class Worker:
    def __init__(
        self,
        queue: JobQueue[ActiveJob],
        serving: ServingModel,
        jobs: JobsConfig,
        *,
        watchdog: Watchdog | None,
        on_swapped: Callable[[LoadedModel | None], None],
    ) -> None:
        self.queue = queue
        self.serving = serving
        self.jobs = jobs
        self._watchdog = watchdog
        self._on_swapped = on_swapped
        self._in_batch: set[ActiveJob] = set()
        self.stopping = threading.Event()  # set: admit nothing new, let the running jobs finish
        self._thread = threading.Thread(target=self._run, name="edge-agent-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        batch: BatchGenerator[ActiveJob] | None = None
        while not self.stopping.is_set() or (batch is not None and not batch.idle):
            try:
                batch = self._turn(batch)
            except Exception as exc:  # a bug in the loop: fail the batch's jobs, go on
                log.exception("the decode loop failed")
                self._fail_batch(f"the decode loop failed ({type(exc).__name__}: {exc})")
                batch = None
                self.stopping.wait(0.1)

    def _turn(self, batch: BatchGenerator[ActiveJob] | None) -> BatchGenerator[ActiveJob] | None:
        self._beat()
        if self.serving.swap_waiting and (batch is None or batch.idle):
            self._swap()
            batch = None
        model = self.serving.model
        if model is None:  # degraded: nothing is ever queued
            self.stopping.wait(0.5)
            return None
        if batch is None:
            limit = model.backend.info.max_batch or self.jobs.max_batch
            rows = min(limit, self.jobs.max_batch)
            batch = BatchGenerator(model.backend, rows, self.jobs.prefill_chunk)
        admitting = not self.serving.swap_waiting and not self.stopping.is_set()
        while admitting and batch.free_slots > 0:
            job = self.queue.get(timeout=0.5 if batch.idle else 0.0)
            if job is None:
                break
            self._start(job, batch, model)
        if not batch.idle:
            self._apply(batch.step(), batch, model)
        return batch

    def _swap(self) -> None:
        old = self.serving.swap()
        try:
            new = self.serving.model
            if old is not None and (new is None or old.backend is not new.backend):
                old.backend.close()
            self._on_swapped(self.serving.model)
        finally:
            self.serving.swapped()

    def _start(self, job: ActiveJob, batch: BatchGenerator[ActiveJob], model: LoadedModel) -> None:
        if job.deadline_passed():
            self._guarded(job, None, job.finished_unstarted, "deadline", model.engine_info)
            return
        if job.generation != self.serving.generation and not self._encode_again(job, model):
            return
        if not self._guarded(job, None, job.started):
            return  # it failed, and was answered so: it must not run as well
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
            interrupt=partial(self._interrupt, job),
        )
        self._in_batch.add(job)
        batch.submit(run, job)

    def _encode_again(self, job: ActiveJob, model: LoadedModel) -> bool:
        """A job queued before a model swap: its ids belong to the old tokenizer."""
        try:
            job.prompt_ids = encode_request(job.request, model)
        except JobError as exc:
            message = f"the model was updated while this job waited, and for it {exc.message}"
            self._guarded(job, None, job.failed, exc.job_code, message)
            return False
        job.generation = self.serving.generation
        log.info("job %s encoded again for the updated model", job.id)
        return True

    def _interrupt(self, job: ActiveJob) -> FinishReason | None:
        self._beat()  # once per token: a hung decode step stops the beats
        if job.cancel_requested.is_set():
            return "cancelled"
        if job.deadline_passed():
            return "deadline"
        return None

    def _apply(
        self, report: StepReport[ActiveJob], batch: BatchGenerator[ActiveJob], model: LoadedModel
    ) -> None:
        for job, text in report.texts:
            if job in self._in_batch:
                self._guarded(job, batch, job.delta, text)
        for end in report.ended:
            job = end.key
            if job not in self._in_batch:  # already failed by its own transition
                continue
            self._in_batch.discard(job)
            if end.result is not None:
                self._guarded(job, None, job.done, end.result, model.engine_info)
            else:
                message = end.error.message if end.error is not None else "unknown failure"
                self._guarded(job, None, job.failed, "engine_error", message)

    def _guarded(
        self,
        job: ActiveJob,
        batch: BatchGenerator[ActiveJob] | None,
        transition: Callable[..., None],
        *args: object,
    ) -> bool:
        """Run one transition of `job`; if it raises, that job fails (and leaves the batch) and
        the answer is False."""
        try:
            transition(*args)
            return True
        except Exception as exc:
            log.exception("job %s: its %s step failed", job.id, transition.__name__)
            if batch is not None:
                batch.remove(job)
            self._in_batch.discard(job)
            self._fail_quietly(job, f"{transition.__name__} failed ({type(exc).__name__}: {exc})")
            return False

    def _fail_batch(self, message: str) -> None:
        jobs, self._in_batch = list(self._in_batch), set()
        for job in jobs:
            self._fail_quietly(job, message)

    def _fail_quietly(self, job: ActiveJob, message: str) -> None:
        try:
            job.failed("engine_error", message)
        except Exception:  # cannot even say so: at least free its id
            log.exception("job %s: could not report its failure", job.id)
            job.book.ids.release(job.id)

    def _beat(self) -> None:
        if self._watchdog is not None:
            self._watchdog.beat()

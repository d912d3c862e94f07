"""The journal's writes after admission, in order, on a thread of their own.

An fsync'd SQLite write takes milliseconds on a good disk and seconds on a worn SD card; made from
the decode loop it would hold every running job's next token, made from paho's network thread it
would hold every delta and keepalive. Here they wait in one FIFO: the decode loop and paho only
enqueue. A write can carry `then`, run once the write is on disk (or has failed), which is how a
job's final event is published only after its answer is journaled: a crash between the two
publishes the journaled answer again at start (`unacked_answers`) instead of computing it twice.

The admission write (`record_accepted`) is not made here: it must be on disk before `accepted` is
sent, and it is made by the intake thread, which may wait for it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from agent.journal import JobJournal, JournalError

log = logging.getLogger(__name__)

Write = Callable[[JobJournal], None]
Then = Callable[[], None]


class JournalWriter:
    """Runs `write(journal)` calls one after another; without a journal, `then` runs at once.

    `on_failed(error)` and `on_ok()` report each write's outcome (the status shows a failing
    journal; jobs go on: an answer matters more than its record)."""

    def __init__(
        self,
        journal: JobJournal | None,
        on_failed: Callable[[JournalError], None],
        on_ok: Callable[[], None],
    ) -> None:
        self.journal = journal
        self._on_failed = on_failed
        self._on_ok = on_ok
        self._queue: queue.SimpleQueue[tuple[Write, Then | None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="edge-agent-journal", daemon=True)
        self._started = False

    def start(self) -> None:
        if self.journal is not None:
            self._thread.start()
            self._started = True

    def write(self, write: Write, then: Then | None = None) -> None:
        if self.journal is None:
            if then is not None:
                _run_then(then)
            return
        if not self._started:  # before start (requeueing journaled jobs): in order, inline
            self._execute(write, then)
            return
        self._queue.put((write, then))

    def close(self, timeout: float = 10.0) -> None:
        """Finish the writes already asked for, then stop."""
        if self._started:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("the journal writer did not finish within %.0f s", timeout)
            self._started = False

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._execute(*item)

    def _execute(self, write: Write, then: Then | None) -> None:
        assert self.journal is not None
        try:
            write(self.journal)
        except JournalError as exc:
            self._on_failed(exc)
        except Exception:  # a bug in one write must not stop the writes after it
            log.exception("a journal write failed")
        else:
            self._on_ok()
        if then is not None:
            _run_then(then)


def _run_then(then: Then) -> None:
    try:
        then()
    except Exception:
        log.exception("publishing after a journal write failed")

"""Outgoing messages with back-pressure: what the agent publishes waits here, not in paho.

paho's own queue is one FIFO with a size limit: a flood of refusals fills it and the answers of
every other job are then dropped ("Message queue full"). Here messages are handed to paho only
while fewer than `limit` QoS 1 publishes are unacknowledged (PUBACK, via paho's `on_publish`);
the rest wait in three classes, sent in this order:

1. control: the retained status and OTA status, never dropped (a retained message still waiting
   is replaced by a newer one on the same topic: the broker would keep only the last anyway);
2. job streams: one per accepted job, its `accepted`, deltas and final event in order, never
   dropped; the streams take turns, so one job's tokens cannot hold back another's answer.
   Deltas still waiting are merged into one (texts concatenated); `seq` is numbered when a delta
   is handed to paho, so it stays contiguous and the deltas still concatenate to the final text;
3. refusals of requests that were never accepted (invalid_json, duplicate, queue_full, a repeated
   id's stored answer, ...): bounded; under a flood the oldest waiting are dropped, counted and
   logged at most once per `DROP_LOG_INTERVAL_S`.

Lock order: the outbox lock is never held while calling paho (paho calls `on_publish` holding
its own lock, and takes the outbox lock there). One thread at a time is the sender, so the order
in which items leave the classes is the order paho gets them.
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

log = logging.getLogger(__name__)

# Hand `topic, payload, retain, correlation_data` to paho; return the message id, or None when
# paho refused it (logged by the caller).
Send = Callable[[str, bytes, bool, bytes | None], int | None]
OnAck = Callable[[], None]
DeltaBuilder = Callable[[int, str], dict[str, Any]]

DEFAULT_LIMIT = 20  # paho's default in-flight window; Mosquitto's default receive maximum
REFUSALS_KEPT = 4096  # ~1 MB of small error events: a burst fits, a flood does not
DROP_LOG_INTERVAL_S = 10.0


@dataclass
class _Item:
    topic: str
    payload: dict[str, Any]
    retain: bool = False
    correlation: bytes | None = None
    on_ack: OnAck | None = None


class _Delta:
    """Deltas of one job not yet handed to paho; merged into one event when they are."""

    __slots__ = ("texts",)

    def __init__(self, text: str) -> None:
        self.texts = [text]


class JobStream:
    """The events of one accepted job, in order. Made by `Outbox.stream`."""

    __slots__ = ("_make_delta", "_outbox", "_pending", "_ready", "_seq", "correlation", "topic")

    def __init__(
        self, outbox: Outbox, topic: str, correlation: bytes | None, make_delta: DeltaBuilder
    ) -> None:
        self._outbox = outbox
        self.topic = topic
        self.correlation = correlation
        self._make_delta = make_delta
        self._pending: deque[_Item | _Delta] = deque()
        self._seq = 0
        self._ready = False  # in the outbox's round of streams with something to send

    def event(self, payload: dict[str, Any], on_ack: OnAck | None = None) -> None:
        """`accepted`, `done`, `error`: sent in order after what this job sent before; never
        dropped. `on_ack` runs (on paho's thread) once the broker has acknowledged it."""
        self._outbox._add_to_stream(
            self, _Item(self.topic, payload, False, self.correlation, on_ack)
        )

    def delta(self, text: str) -> None:
        """Streamed text; numbered (`seq`) when it is sent, merged with deltas still waiting."""
        self._outbox._add_delta(self, text)

    def _pop(self) -> _Item:
        """The next item to send (called under the outbox lock)."""
        head = self._pending.popleft()
        if isinstance(head, _Item):
            return head
        payload = self._make_delta(self._seq, "".join(head.texts))
        self._seq += 1
        return _Item(self.topic, payload, False, self.correlation)


class Outbox:
    def __init__(
        self, send: Send, *, limit: int = DEFAULT_LIMIT, refusals_kept: int = REFUSALS_KEPT
    ) -> None:
        self._send = send
        self._limit = limit
        self._lock = threading.Lock()
        self._control: deque[_Item] = deque()
        self._streams: deque[JobStream] = deque()  # streams with something to send, in turn
        self._refusals: deque[_Item] = deque()
        self._refusals_kept = refusals_kept
        self._inflight = 0
        self._awaiting: dict[int, OnAck | None] = {}  # message id -> callback, until PUBACK
        self._early: set[int] = set()  # acknowledged before `send` returned its id
        self._in_send = False
        self._sending = False  # one thread at a time hands items to paho
        self.dropped = 0  # refusals dropped under a flood, since start
        self._dropped_unlogged = 0
        self._last_drop_log = 0.0

    # --- adding ----------------------------------------------------------------------------

    def stream(self, topic: str, correlation: bytes | None, make_delta: DeltaBuilder) -> JobStream:
        return JobStream(self, topic, correlation, make_delta)

    def control(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        retain: bool = False,
        correlation: bytes | None = None,
        on_ack: OnAck | None = None,
    ) -> None:
        item = _Item(topic, payload, retain, correlation, on_ack)
        with self._lock:
            if retain:
                for index, waiting in enumerate(self._control):
                    if waiting.retain and waiting.topic == topic:
                        del self._control[index]
                        break
            self._control.append(item)
            start = self._claim_sender()
        if start:
            self._pump()

    def refusal(self, topic: str, payload: dict[str, Any], correlation: bytes | None) -> None:
        item = _Item(topic, payload, False, correlation)
        with self._lock:
            if len(self._refusals) >= self._refusals_kept:
                self._refusals.popleft()
                self.dropped += 1
                self._dropped_unlogged += 1
            self._refusals.append(item)
            start = self._claim_sender()
        self._log_drops()
        if start:
            self._pump()

    def _add_to_stream(self, stream: JobStream, item: _Item) -> None:
        with self._lock:
            stream._pending.append(item)
            self._make_ready(stream)
            start = self._claim_sender()
        if start:
            self._pump()

    def _add_delta(self, stream: JobStream, text: str) -> None:
        with self._lock:
            tail = stream._pending[-1] if stream._pending else None
            if isinstance(tail, _Delta):
                tail.texts.append(text)
            else:
                stream._pending.append(_Delta(text))
                self._make_ready(stream)
            start = self._claim_sender()
        if start:
            self._pump()

    def _make_ready(self, stream: JobStream) -> None:
        if not stream._ready:
            stream._ready = True
            self._streams.append(stream)

    def _claim_sender(self) -> bool:
        if self._sending or self._inflight >= self._limit:
            return False
        self._sending = True
        return True

    # --- sending ---------------------------------------------------------------------------

    def _next(self) -> _Item | None:
        """The next item by class (under the lock)."""
        if self._control:
            return self._control.popleft()
        if self._streams:
            stream = self._streams.popleft()
            item = stream._pop()
            if stream._pending:
                self._streams.append(stream)  # its next event waits for the others' turn
            else:
                stream._ready = False
            return item
        if self._refusals:
            return self._refusals.popleft()
        return None

    def _pump(self) -> None:
        """Hand items to paho while the window has room; the caller holds the sender role."""
        while True:
            with self._lock:
                item = self._next() if self._inflight < self._limit else None
                if item is None:
                    self._sending = False
                    return
                self._inflight += 1
                self._in_send = True
            mid: int | None = None
            try:
                data = json.dumps(item.payload, ensure_ascii=False).encode("utf-8")
                mid = self._send(item.topic, data, item.retain, item.correlation)
            except Exception:  # a bug here must not leave the sender role taken for ever
                log.exception("publishing to %s failed", item.topic)
            acked: OnAck | None = None
            with self._lock:
                self._in_send = False
                if mid is None:
                    self._inflight -= 1
                elif mid in self._early:
                    self._inflight -= 1
                    acked = item.on_ack
                else:
                    self._awaiting[mid] = item.on_ack
                self._early.clear()
            if acked is not None:
                _run_ack(acked)

    def acknowledged(self, mid: int) -> None:
        """paho's `on_publish`: the broker acknowledged message `mid`."""
        with self._lock:
            if mid in self._awaiting:
                on_ack = self._awaiting.pop(mid)
                self._inflight -= 1
            else:
                if self._in_send:  # perhaps the one being sent: `_pump` looks here
                    self._early.add(mid)
                return  # else not ours to count (QoS 0 telemetry, the exit status)
            start = self._claim_sender()
        if on_ack is not None:
            _run_ack(on_ack)
        if start:
            self._pump()

    @property
    def waiting(self) -> int:
        """Items not yet handed to paho (for telemetry and tests)."""
        with self._lock:
            streams = sum(len(s._pending) for s in self._streams)
            return len(self._control) + streams + len(self._refusals)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything was handed to paho and acknowledged (before going offline)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                idle = not (self._control or self._streams or self._refusals or self._inflight)
            if idle or time.monotonic() >= deadline:
                return idle
            time.sleep(0.02)

    def _log_drops(self) -> None:
        if not self._dropped_unlogged:
            return
        now = time.monotonic()
        if now - self._last_drop_log < DROP_LOG_INTERVAL_S:
            return
        with self._lock:
            count, self._dropped_unlogged = self._dropped_unlogged, 0
            total = self.dropped
        self._last_drop_log = now
        log.warning(
            "outgoing refusals dropped: %d since the last report, %d since start (a sender is "
            "flooding this device with requests it refuses; answers to accepted jobs still go out)",
            count,
            total,
        )


def _run_ack(on_ack: OnAck) -> None:
    try:
        on_ack()
    except Exception:  # the journal reports its own failures; nothing else may stop paho
        log.exception("acknowledgement callback failed")

"""The agent's bounded job queue (priority first, then arrival) and its memory of answered jobs."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from agent.jobs import JobRequest


@dataclass(frozen=True)
class Reply:
    """Where a job's events go: the MQTT v5 Response Topic (with its Correlation Data) or the
    device's default results topic."""

    topic: str
    correlation_data: bytes | None = None


class Queued(Protocol):
    """What the queue orders: an id and its request's priority (the agent's `ActiveJob`)."""

    @property
    def id(self) -> str: ...

    @property
    def request(self) -> JobRequest: ...


Item = TypeVar("Item", bound=Queued)


class QueueFull(Exception):
    pass


class JobQueue(Generic[Item]):
    """Thread-safe, bounded; higher `priority` first, FIFO within a priority."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._heap: list[tuple[int, int, Item]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job: Item, announce: Callable[[int], None], force: bool = False) -> None:
        """Queue a job, calling `announce(position)` first (under the lock) so its `accepted` event
        is published before a worker can start it. Position 0 = next to run."""
        with self._cond:
            if len(self._heap) >= self.capacity and not force:  # force: jobs already accepted
                raise QueueFull
            key = -job.request.priority
            announce(sum(1 for k, _, _ in self._heap if k <= key))
            heapq.heappush(self._heap, (key, next(self._order), job))
            self._cond.notify()

    def get(self, timeout: float) -> Item | None:
        """The next job, or None after `timeout` seconds or once closed and empty."""
        with self._cond:
            if not self._heap and not self._closed:
                self._cond.wait(timeout)
            if not self._heap:
                return None
            return heapq.heappop(self._heap)[2]

    def remove(self, job_id: str) -> Item | None:
        with self._cond:
            for index, (_, _, job) in enumerate(self._heap):
                if job.id == job_id:
                    self._heap.pop(index)
                    heapq.heapify(self._heap)
                    return job
        return None

    def contains(self, job_id: str) -> bool:
        with self._cond:
            return any(job.id == job_id for _, _, job in self._heap)

    def drain(self) -> list[Item]:
        with self._cond:
            jobs = [job for _, _, job in sorted(self._heap)]
            self._heap.clear()
            return jobs

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)


class ResultStore:
    """The final `done` event of recently answered jobs, so a repeated id is answered again
    without recomputing. Bounded: the oldest answers are forgotten first."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, job_id: str, event: dict[str, Any]) -> None:
        with self._lock:
            self._results[job_id] = event
            self._results.move_to_end(job_id)
            while len(self._results) > self._capacity:
                self._results.popitem(last=False)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._results.get(job_id)

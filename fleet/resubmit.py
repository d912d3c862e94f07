"""Fleet jobs that survive the death of the device that took them: send to the shared fleet topic,
follow each job's events, and send it again when its device cannot answer any more.

Why the sender, not the broker, has to do this (measured with Mosquitto 2.0, see
tests/reliability/test_failover.py):
- a device acknowledges (PUBACK) a fleet job as soon as it is queued in the agent, so there is
  nothing unacknowledged left for the broker to redeliver when the device dies;
- the dead device's session outlives it (clean_start False, session expiry 1 h, so that its own
  jobs wait for its return), shared subscription included, and Mosquitto keeps handing it its
  round-robin share of new fleet jobs, queued for a device that may never return (Mosquitto
  issue #2662: no redistribution to the other members).

So a job is sent again, with the same id, when
- the device that accepted it publishes `offline` (its Last Will: at once after a crash that
  closes the socket; after a power cut or a network loss once the broker's keepalive check
  fires, 1.5 x the keepalive plus a few seconds: 5.5-6.6 s measured at keepalive_s = 2, 11 s at
  4, so an estimated 45-50 s at the agent's default of 30), or
- no device accepted it within `accept_timeout_s` (it sits in a dead device's session), or
- the device answered `queue_full` or `shutting_down` (codes that mean "send it elsewhere").
A job sent again goes straight to the least loaded device whose retained status says `online`
(`P/D/jobs`), not to the fleet topic: there the broker could hand it to the dead session again
(with two devices it alternates, so a job can land on the dead one every time). Only when no
device is known to be online does it go to the fleet topic again. The first final answer wins;
a late answer from a device that came back (and re-ran the job from its journal) is ignored.
Delivery is therefore at least once: a job may run twice, never go unanswered.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import MqttConfig
from agent.contract.errors import RETRY_CODES
from agent.contract.events import JobFailed
from agent.contract.jobs import MAX_PRIORITY
from agent.mqtt_link import Incoming, MqttLink, Subscription
from agent.topics import Topics

log = logging.getLogger(__name__)

__all__ = ["MAX_PRIORITY", "RETRY_CODES", "FleetSubmitter", "Resubmission", "ResubmitPolicy"]


@dataclass(frozen=True)
class ResubmitPolicy:
    accept_timeout_s: float = 5.0  # an `accepted` normally comes back within milliseconds
    max_attempts: int = 4  # sends per job, the first included
    retry_delay_s: float = 1.0  # before re-sending after queue_full / shutting_down
    avoid_s: float = 10.0  # a device that refused or swallowed a job is not chosen for this long
    # A resubmitted job has waited longest: let it run before newer work on the next device.
    boost_priority: bool = True


@dataclass(frozen=True)
class Resubmission:
    at: float  # time.monotonic()
    job_id: str
    reason: str


@dataclass
class _Tracked:
    payload: dict[str, Any]
    attempts: int = 0
    sent_at: float = 0.0
    device: str | None = None  # who accepted the current attempt
    target: str | None = None  # where the current attempt was sent (None: the fleet topic)
    retry_at: float | None = None  # scheduled re-send
    final: dict[str, Any] | None = None
    final_device: str | None = None
    final_at: float | None = None
    devices: list[str] = field(default_factory=list)
    failed_on: set[str] = field(default_factory=set)  # devices that refused or swallowed it


class FleetSubmitter:
    """Send jobs to any one device of the fleet and see each answered, whichever device dies."""

    def __init__(
        self,
        broker: MqttConfig,
        policy: ResubmitPolicy | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.policy = policy or ResubmitPolicy()
        self._topics = Topics(broker.prefix, "+")
        self._prefix = broker.prefix
        self._on_event = on_event
        self._jobs: dict[str, _Tracked] = {}
        self._states: dict[str, str] = {}  # device -> its last status state
        self._avoid_until: dict[str, float] = {}  # device -> monotonic time
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self.resubmissions: list[Resubmission] = []
        self._link = MqttLink(
            broker,
            client_id=f"edge-fleet-resubmit-{uuid.uuid4().hex[:8]}",
            subscriptions=[
                Subscription(f"{broker.prefix}/+/results/+"),
                Subscription(f"{broker.prefix}/+/status"),
            ],
            on_message=self._handle,
        )
        self._timer = threading.Thread(target=self._watch, name="resubmit-timer", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        self._link.start()
        if not self._link.wait_connected(timeout_s):
            self._link.stop()
            raise ConnectionError("cannot reach the broker")
        time.sleep(0.2)  # let the SUBACK land before the first answer can come
        self._timer.start()

    def close(self) -> None:
        self._stop.set()
        if self._timer.is_alive():
            self._timer.join(5)
        self._link.stop()

    def __enter__(self) -> FleetSubmitter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the caller's side ---------------------------------------------------------------------

    def submit(self, payload: dict[str, Any]) -> str:
        """Send a job (its `id` is the key for the whole story; one is made if missing)."""
        payload = dict(payload)
        job_id = str(payload.setdefault("id", f"fleet-{uuid.uuid4().hex[:12]}"))
        with self._lock:
            if job_id in self._jobs:
                raise ValueError(f"job {job_id!r} was already submitted")
            tracked = _Tracked(payload)
            self._jobs[job_id] = tracked
            self._send(job_id, tracked)
        return job_id

    def wait(self, job_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        """The final event of each job; raises TimeoutError naming the jobs still open."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                open_ids = [i for i in job_ids if self._jobs[i].final is None]
                if not open_ids:
                    return {i: self._jobs[i].final for i in job_ids}  # type: ignore[misc]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(open_ids)} job(s) unanswered: {open_ids[:10]}")
                self._lock.wait(min(remaining, 0.5))

    def device_of(self, job_id: str) -> str | None:
        """The device currently holding the job (the one that accepted its last attempt)."""
        with self._lock:
            return self._jobs[job_id].device

    def history(self, job_id: str) -> tuple[list[str], str | None, float | None, int]:
        """Devices that accepted it, the one that answered, when (monotonic), and sends."""
        with self._lock:
            t = self._jobs[job_id]
            return list(t.devices), t.final_device, t.final_at, t.attempts

    # --- internals (paho's thread and the timer) ----------------------------------------------

    def _send(self, job_id: str, tracked: _Tracked) -> None:
        """Publish an attempt; caller holds the lock."""
        tracked.attempts += 1
        tracked.sent_at = time.monotonic()
        tracked.device = None
        tracked.retry_at = None
        payload = tracked.payload
        tracked.target = None
        if tracked.attempts > 1:
            tracked.target = self._least_loaded_online(tracked.failed_on)
            if self.policy.boost_priority:
                boosted = min(int(payload.get("priority", 0)) + 1, MAX_PRIORITY)
                payload = {**payload, "priority": max(boosted, 1)}
        if tracked.target is None:
            topic = self._topics.fleet_jobs
        else:
            topic = Topics(self._prefix, tracked.target).jobs
        self._link.publish(topic, payload)

    def _least_loaded_online(self, exclude: set[str]) -> str | None:
        """An online device that has not failed this job and is not avoided; None if there is
        none (then the fleet topic, and the broker, choose). Caller holds the lock."""
        now = time.monotonic()
        online = [
            d
            for d, state in self._states.items()
            if state == "online" and d not in exclude and self._avoid_until.get(d, 0.0) <= now
        ]
        if not online:
            return None
        load = dict.fromkeys(online, 0)
        for tracked in self._jobs.values():
            holder = tracked.device or tracked.target
            if tracked.final is None and holder in load:
                load[holder] += 1
        return min(online, key=lambda d: (load[d], d))

    def _avoid(self, device: str) -> None:
        self._avoid_until[device] = time.monotonic() + self.policy.avoid_s

    def _resubmit(self, job_id: str, tracked: _Tracked, reason: str) -> None:
        if tracked.attempts >= self.policy.max_attempts:
            log.error("job %s: giving up after %d sends (%s)", job_id, tracked.attempts, reason)
            message = f"no device answered after {tracked.attempts} sends; last: {reason}"
            self._finish(job_id, tracked, _gave_up(job_id, message), None)
            return
        log.warning("job %s: sending it again (%s)", job_id, reason)
        self.resubmissions.append(Resubmission(time.monotonic(), job_id, reason))
        self._send(job_id, tracked)

    def _finish(
        self, job_id: str, tracked: _Tracked, event: dict[str, Any], device: str | None
    ) -> None:
        tracked.final = event
        tracked.final_device = device
        tracked.final_at = time.monotonic()
        self._lock.notify_all()

    def _handle(self, message: Incoming) -> None:
        parts = message.topic.split("/")
        if len(parts) < 3 or parts[0] != self._prefix:
            return
        try:
            event = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        device = parts[1]
        if len(parts) == 3 and parts[2] == "status":
            state = str(event.get("state"))
            with self._lock:
                self._states[device] = state
                if state == "online":  # (re)started: give it a fresh chance
                    self._avoid_until.pop(device, None)
            if state == "offline":
                self._device_gone(device)
            return
        if len(parts) == 4 and parts[2] == "results":
            self._job_event(parts[3], device, event)

    def _device_gone(self, device: str) -> None:
        with self._lock:
            for job_id, tracked in self._jobs.items():
                if tracked.final is None and device in (tracked.device, tracked.target):
                    self._resubmit(job_id, tracked, f"device {device} went offline")

    def _job_event(self, job_id: str, device: str, event: dict[str, Any]) -> None:
        with self._lock:
            tracked = self._jobs.get(job_id)
            if tracked is None or tracked.final is not None:
                return  # not ours, or a late answer from a device that came back
            kind = event.get("event")
            if kind != "error":
                self._avoid_until.pop(device, None)  # it is alive and taking work
            if kind in ("accepted", "delta"):
                if tracked.device != device:
                    tracked.device = device
                    tracked.devices.append(device)
            elif kind == "done":
                self._finish(job_id, tracked, event, device)
            elif kind == "error":
                code = (event.get("error") or {}).get("code")
                if code == "duplicate":  # it is queued or running there: that device has it
                    tracked.device = device
                elif code in RETRY_CODES:
                    if tracked.device in (None, device):  # not a stale device's refusal
                        tracked.failed_on.add(device)
                        self._avoid(device)
                        tracked.device = None
                        tracked.retry_at = time.monotonic() + self.policy.retry_delay_s
                else:
                    self._finish(job_id, tracked, event, device)
        if self._on_event is not None:
            self._on_event(device, event)

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self._lock:
                for job_id, tracked in self._jobs.items():
                    if tracked.final is not None:
                        continue
                    if tracked.retry_at is not None and now >= tracked.retry_at:
                        self._resubmit(job_id, tracked, "the device asked to send it elsewhere")
                    elif (
                        tracked.device is None
                        and tracked.retry_at is None
                        and now - tracked.sent_at > self.policy.accept_timeout_s
                    ):
                        waited = now - tracked.sent_at
                        if tracked.target is not None:  # it swallowed a job sent to it alone
                            tracked.failed_on.add(tracked.target)
                            self._avoid(tracked.target)
                        self._resubmit(job_id, tracked, f"no device accepted it in {waited:.1f} s")


def _gave_up(job_id: str, message: str) -> dict[str, Any]:
    """The submitter's own final event (code `no_device`, not one of the agent's codes)."""
    return JobFailed(job_id, "no_device", message).to_payload()

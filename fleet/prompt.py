"""`edge-fleet prompt`: send one job to a device (or the fleet) and follow its events.

A fleet job goes through `FleetSubmitter`: if the device that took it dies (its Last Will) or
never accepts it, the job is sent again to another online device, and the answer starts over.
"""

from __future__ import annotations

import json
import queue
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, TextIO

from agent.config import MqttConfig
from agent.contract.errors import ContractError
from agent.contract.events import FINAL_EVENTS
from agent.contract.jobs import DEFAULT_MAX_TOKENS, JobSpec, Message
from agent.errors import AgentError
from agent.mqtt_link import Incoming, MqttLink, Subscription
from agent.topics import Topics
from fleet.resubmit import RETRY_CODES, FleetSubmitter


@dataclass(frozen=True)
class PromptJob:
    text: str
    device: str | None  # None = any device of the fleet (shared subscription)
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    raw: bool = False  # send `prompt` (plain completion) instead of a chat message
    system: str | None = None
    stream: bool = True
    job_id: str | None = None

    def spec(self, job_id: str) -> JobSpec:
        """The job request, validated as a device validates it (raises BadJob otherwise)."""
        if self.raw:
            prompt, messages = self.text, None
        else:
            system = (Message("system", self.system),) if self.system else ()
            prompt, messages = None, (*system, Message("user", self.text))
        spec = JobSpec(
            id=job_id,
            prompt=prompt,
            messages=messages,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            stream=self.stream,
        )
        try:
            return spec.checked()
        except ContractError as exc:
            raise BadJob(exc.code, f"a device would refuse this job: {exc.message}") from None

    def payload(self, job_id: str) -> dict[str, Any]:
        return self.spec(job_id).to_payload()


class NoAnswer(Exception):
    pass


class BadJob(AgentError):
    """The job breaks the contract (`invalid_request`): it is not sent."""


def send_prompt(
    broker: MqttConfig,
    job: PromptJob,
    *,
    timeout_s: float,
    on_event: Any,
) -> dict[str, Any]:
    """Publish the job, pass every event to `on_event`, return the final `done` or `error`."""
    job_id = job.job_id or f"prompt-{uuid.uuid4().hex[:12]}"
    payload = job.payload(job_id)  # BadJob before any connection if a device would refuse it
    if job.device is None:
        return _send_to_fleet(broker, payload, job_id, timeout_s=timeout_s, on_event=on_event)
    device_topics = Topics(broker.prefix, job.device or "+")
    results = device_topics.results(job_id)
    events: queue.Queue[dict[str, Any]] = queue.Queue()

    def on_message(message: Incoming) -> None:
        try:
            events.put(json.loads(message.payload))
        except ValueError:  # a malformed event is skipped; the wait for the answer goes on
            return

    link = MqttLink(
        broker,
        client_id=f"edge-fleet-{uuid.uuid4().hex[:8]}",
        subscriptions=[Subscription(results)],
        on_message=on_message,
    )
    link.start()
    try:
        if not link.wait_connected(10):
            raise NoAnswer(f"cannot reach the broker at {broker.host}:{broker.port}")
        time.sleep(0.2)  # let the SUBACK land before the job can be answered
        topic = device_topics.jobs if job.device else device_topics.fleet_jobs
        link.publish(topic, payload)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer(f"no answer to job {job_id} within {timeout_s:.0f} s")
            try:
                event = events.get(timeout=remaining)
            except queue.Empty:
                continue
            on_event(event)
            if event.get("event") in FINAL_EVENTS:
                return event
    finally:
        link.stop()


def _send_to_fleet(
    broker: MqttConfig, payload: dict[str, Any], job_id: str, *, timeout_s: float, on_event: Any
) -> dict[str, Any]:
    """The fleet path: any one device answers, another one if it dies. When the answer has to
    start over on another device, `on_event` gets a `resent` event (this tool's own, not the
    agent's) before the new device's events, so a reader knows earlier deltas are void."""
    streaming_from: list[str] = []  # the device whose deltas were passed on

    def relay(device: str, event: dict[str, Any]) -> None:
        if event.get("id") != job_id:
            return
        if (event.get("error") or {}).get("code") in RETRY_CODES:
            return  # not an answer: the submitter sends the job elsewhere
        if event.get("event") == "delta" or event.get("event") == "done":
            if streaming_from and streaming_from[-1] != device:
                on_event({"id": job_id, "event": "resent", "device": device})
            if not streaming_from or streaming_from[-1] != device:
                streaming_from.append(device)
        on_event(event)

    try:
        with FleetSubmitter(broker, on_event=relay) as submitter:
            submitter.submit(payload)
            final = submitter.wait([job_id], timeout_s)[job_id]
    except ConnectionError:
        raise NoAnswer(f"cannot reach the broker at {broker.host}:{broker.port}") from None
    except TimeoutError:
        raise NoAnswer(f"no answer to job {job_id} within {timeout_s:.0f} s") from None
    if (final.get("error") or {}).get("code") == "no_device":
        on_event(final)  # the submitter's own verdict never came over MQTT
    return final


def print_event(event: dict[str, Any], out: TextIO = sys.stdout) -> None:
    """Human output: the streamed text, then one line of figures."""
    kind = event.get("event")
    if kind == "delta":
        out.write(event.get("text", ""))
        out.flush()
    elif kind == "done":
        timing, usage = event.get("timing", {}), event.get("usage", {})
        engine = event.get("engine", {})
        out.write(
            f"\n\n[{event.get('finish_reason')}] {usage.get('prompt_tokens')} prompt + "
            f"{usage.get('completion_tokens')} generated tokens | TTFT {timing.get('ttft_ms')} ms"
            f" | {timing.get('tokens_per_s')} tokens/s | queue {timing.get('queue_ms')} ms"
            f" | total {timing.get('total_ms')} ms | {engine.get('name')} {engine.get('version')}"
            f" ({engine.get('precision')}, {engine.get('backend')}) on {event.get('device')}\n"
        )
    elif kind == "resent":
        out.write(f"\n[its device went away; answered again by {event.get('device')}]\n")
    elif kind == "error":
        err = event.get("error", {})
        out.write(f"\nerror [{err.get('code')}]: {err.get('message')}\n")

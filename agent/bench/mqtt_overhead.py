"""What the agent adds to a job: the same job over MQTT (publish -> `done` received, through a real
Mosquitto, the agent's parsing, journal, queue and batching worker) against a direct call on the
same loaded model, interleaved run by run so drift in the machine's speed hits both alike.

The overhead is the median of the paired differences. Both sides generate the same greedy tokens
(checked), so the difference is the agent's and the broker's time, not the model's. The job is
short (the first `PROBE_PROMPT_TOKENS` tokens of the bench prompt, `PROBE_TOKENS` new tokens,
non-streaming) and repeated `PROBE_RUNS_PER_RUN` times per `--runs`: a long job's own run-to-run
spread (measured: +-5 ms for a 156-token prefill, tens of ms over a long answer) would hide a
millisecond-sized overhead.
"""

from __future__ import annotations

import json
import queue
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.bench.workload import BenchSettings
from agent.config import AgentConfig, JobsConfig, MqttConfig
from agent.errors import AgentError
from agent.generation import GenerationRequest, generate
from agent.local_broker import LocalBroker, start_local_broker
from agent.runtime import LoadedModel
from agent.service import AgentService

PROBE_TOKENS = 8
PROBE_PROMPT_TOKENS = 32
PROBE_RUNS_PER_RUN = 4


def measure_mqtt_overhead(
    model: LoadedModel, prompt_ids: list[int], settings: BenchSettings
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        broker: LocalBroker | None = None
        if settings.broker:
            host, _, port = settings.broker.rpartition(":")
        else:
            broker = start_local_broker(Path(tmp) / "broker")
            host, port = broker.host, str(broker.port)
        try:
            return _measure(model, prompt_ids, settings, host, int(port), Path(tmp) / "state")
        finally:
            if broker is not None:
                broker.stop()


def _measure(
    model: LoadedModel,
    prompt_ids: list[int],
    settings: BenchSettings,
    host: str,
    port: int,
    state_dir: Path,
) -> dict[str, Any]:
    probe_ids = prompt_ids[:PROBE_PROMPT_TOKENS]
    text = model.codec.tokenizer.decode(probe_ids, skip_special_tokens=False)
    tokens = min(settings.new_tokens, PROBE_TOKENS)
    request = GenerationRequest(model.codec.encode_prompt(text), max_tokens=tokens)
    config = AgentConfig(
        device_id=f"bench-{uuid.uuid4().hex[:8]}",
        state_dir=state_dir,
        mqtt=MqttConfig(host=host, port=port, session_expiry_s=0),
        jobs=JobsConfig(max_batch=1, max_tokens_limit=max(2048, settings.new_tokens)),
    )
    service = AgentService(config, model)
    service.start()
    listener: _Listener | None = None
    try:
        listener = client = _Listener(host, port, service.topics.results("+"))
        if not service.link.wait_connected(10):
            raise AgentError("no_broker", f"the agent cannot reach the broker at {host}:{port}")

        def over_mqtt(job_id: str) -> tuple[float, dict[str, Any]]:
            started = time.perf_counter()
            job = {"id": job_id, "prompt": text, "max_tokens": tokens}
            client.publish(service.topics.jobs, job)
            done = client.final(job_id, timeout=300)
            return (time.perf_counter() - started) * 1000, done

        def direct() -> tuple[float, int]:
            started = time.perf_counter()
            result = generate(model.backend, model.codec, request)
            return (time.perf_counter() - started) * 1000, result.completion_tokens

        for warm_up in range(3):
            over_mqtt(f"warm-up-{warm_up}")
            direct()
        direct_ms, mqtt_ms = [], []
        for run in range(settings.runs * PROBE_RUNS_PER_RUN):
            direct_time, generated = direct()
            mqtt_time, done = over_mqtt(f"bench-{run}")
            if done.get("event") != "done" or done["usage"]["completion_tokens"] != generated:
                raise AgentError(
                    "bench_mismatch", f"the job over MQTT did not do the same work: {done}"
                )
            direct_ms.append(direct_time)
            mqtt_ms.append(mqtt_time)
    finally:
        if listener is not None:
            listener.close()
        service.shutdown(grace_s=30)
    overheads = [m - d for m, d in zip(mqtt_ms, direct_ms, strict=True)]
    return {
        "mqtt_tokens": generated,
        "direct_ms": round(statistics.median(direct_ms), 1),
        "mqtt_ms": round(statistics.median(mqtt_ms), 1),
        "mqtt_overhead_ms": round(statistics.median(overheads), 2),
        "mqtt_overhead_ms_all": [round(o, 2) for o in overheads],
    }


class _Listener:
    """The client side: publishes jobs, collects each job's final event."""

    def __init__(self, host: str, port: int, results: str) -> None:
        self._finals: queue.Queue[dict[str, Any]] = queue.Queue()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-bench-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self._client.on_message = self._on_message
        try:
            self._client.connect(host, port, keepalive=60)
        except OSError as exc:
            raise AgentError(
                "no_broker", f"the bench client cannot reach the broker at {host}:{port}: {exc}"
            ) from exc
        self._client.subscribe(results, qos=1)
        self._client.loop_start()
        time.sleep(0.2)  # the SUBACK lands before the first job can be answered

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        event = json.loads(message.payload)
        if event.get("event") in ("done", "error"):
            self._finals.put(event)

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self._client.publish(topic, json.dumps(payload).encode(), qos=1)

    def final(self, job_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self._finals.get(timeout=max(0.0, deadline - time.monotonic()))
            if event.get("id") == job_id:
                return event

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

"""The agent over a real Mosquitto with the real SmolLM2 bundle: answers, streaming, the MQTT v5
request/response properties, every error code, duplicates, cancel, hostile payloads."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import numpy as np

from agent.backends.base import Backend, BackendInfo, Logits, TokenIds
from agent.backends.onnxruntime_backend import OnnxRuntimeBackend
from agent.contract.bundle import ONNX_MODEL_FILE
from agent.errors import EngineError
from agent.jobs import InvalidPayload, RequestLimits, parse_job
from agent.mqtt_link import Incoming
from agent.runtime import LoadedModel
from agent.service import AgentService
from tests.conftest import MqttProbe
from tests.e2e.conftest import ServiceFactory

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


def results_topic(service: AgentService, job_id: str) -> str:
    return service.topics.results(job_id)


def ask(
    probe: MqttProbe, service: AgentService, payload: dict[str, Any], timeout: float = 120
) -> list[dict[str, Any]]:
    topic = results_topic(service, payload["id"])
    probe.subscribe(topic)
    probe.publish(service.topics.jobs, payload)
    return probe.events_until_final(topic, timeout)


def wait_for_event(probe: MqttProbe, topic: str, kind: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        event = probe.next(deadline - time.monotonic(), topic).json()
        if event["event"] == kind:
            return dict(event)
        assert event["event"] not in ("done", "error"), f"expected {kind}, got {event}"


def test_greedy_answer_streams_and_concatenates_exactly(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service()
    events = ask(probe, service, {"id": "paris-1", "messages": CAPITAL, "stream": True})
    kinds = [e["event"] for e in events]
    assert kinds[0] == "accepted" and events[0]["queue_position"] == 0
    assert kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    deltas = [e for e in events if e["event"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    done = events[-1]
    assert "".join(d["text"] for d in deltas) == done["text"]
    assert "Paris" in done["text"]
    assert done["finish_reason"] == "stop"
    assert all(e["id"] == "paris-1" for e in events)
    assert done["usage"]["prompt_tokens"] > 10 and done["usage"]["completion_tokens"] > 2
    assert set(done["timing"]) == {"queue_ms", "ttft_ms", "total_ms", "tokens_per_s"}
    assert done["timing"]["tokens_per_s"] > 0 and done["timing"]["ttft_ms"] > 0
    assert done["engine"]["backend"] == "onnxruntime" and done["engine"]["precision"] == "fp32"
    assert done["device"] == service.config.device_id


def test_non_streamed_job_sends_only_accepted_and_done(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service()
    events = ask(probe, service, {"id": "quiet", "messages": CAPITAL, "max_tokens": 12})
    assert [e["event"] for e in events] == ["accepted", "done"]


def test_response_topic_and_correlation_data_are_honoured(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service()
    reply_topic = "clients/abc/replies"
    probe.subscribe(reply_topic)
    probe.subscribe(results_topic(service, "rt-1"))
    probe.publish(
        service.topics.jobs,
        {"id": "rt-1", "messages": CAPITAL, "stream": True, "max_tokens": 8},
        response_topic=reply_topic,
        correlation_data=b"\x00corr-\xff",
    )
    events = []
    while True:
        message = probe.next(60)
        assert message.topic == reply_topic, "an event went to the default results topic"
        assert message.correlation_data == b"\x00corr-\xff"
        events.append(message.json())
        if events[-1]["event"] == "done":
            break
    time.sleep(0.3)
    assert probe.inbox.empty() and not probe.pending


def test_a_response_topic_outside_the_allowed_space_is_refused_with_the_reason(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    """With the fleet setting (provision.sh writes it) a forged Response Topic gets a coded error
    on the job's own results topic; one inside the device's results space is honoured."""
    service = agent_service(reply_topics=("{prefix}/{device}/results/#",))
    device = service.config.device_id
    forged = "edgellm/other-device/jobs"
    probe.subscribe(forged)
    probe.subscribe(results_topic(service, "forged-1"))
    probe.publish(
        service.topics.jobs,
        {"id": "forged-1", "prompt": "Hi", "max_tokens": 2},
        response_topic=forged,
        correlation_data=b"c",
    )
    message = probe.next(30)
    assert message.topic == results_topic(service, "forged-1")
    error = message.json()
    assert error["event"] == "error" and error["error"]["code"] == "invalid_request"
    assert forged in error["error"]["message"]
    assert f"edgellm/{device}/results/#" in error["error"]["message"]

    mine = f"edgellm/{device}/results/inbox/7"
    probe.subscribe(mine)
    probe.publish(
        service.topics.jobs,
        {"id": "mine-1", "prompt": "Hi", "max_tokens": 2},
        response_topic=mine,
        correlation_data=b"m",
    )
    events = [probe.next(60)]
    while events[-1].json()["event"] not in ("done", "error"):
        events.append(probe.next(60))
    assert {m.topic for m in events} == {mine} and events[-1].json()["event"] == "done"
    time.sleep(0.3)
    assert probe.inbox.empty()  # nothing ever reached the forged topic


def test_stop_string_and_raw_prompt(agent_service: ServiceFactory, probe: MqttProbe) -> None:
    service = agent_service()
    events = ask(
        probe,
        service,
        {"id": "raw", "prompt": "Count: one, two, three,", "stop": [","], "stream": True},
    )
    done = events[-1]
    assert done["finish_reason"] == "stop" and "," not in done["text"]
    assert "".join(e["text"] for e in events if e["event"] == "delta") == done["text"]


def test_fleet_shared_subscription_reaches_the_device(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service()
    topic = results_topic(service, "fleet-1")
    probe.subscribe(topic)
    probe.publish(service.topics.fleet_jobs, {"id": "fleet-1", "messages": CAPITAL})
    assert probe.events_until_final(topic)[-1]["event"] == "done"


def test_invalid_json_goes_to_the_invalid_topic(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service()
    topic = results_topic(service, "_invalid")
    probe.subscribe(topic)
    probe.publish(service.topics.jobs, b"{broken")
    event = probe.next(10, topic).json()
    assert event == {
        "id": None,
        "event": "error",
        "error": {"code": "invalid_json", "message": event["error"]["message"]},
    }


def test_invalid_request_is_answered_on_the_jobs_topic(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service()
    events = ask(probe, service, {"id": "bad-1", "prompt": "x", "temperature": 9})
    assert events == [
        {
            "id": "bad-1",
            "event": "error",
            "error": {"code": "invalid_request", "message": events[0]["error"]["message"]},
        }
    ]
    assert "temperature" in events[0]["error"]["message"]


def test_prompt_too_long(
    agent_service: ServiceFactory, probe: MqttProbe, loaded_model: LoadedModel
) -> None:
    small = OnnxRuntimeBackend(loaded_model.bundle.file(ONNX_MODEL_FILE), max_seq_len=32)
    service = agent_service(backend=small)
    events = ask(probe, service, {"id": "long-1", "prompt": "word " * 100})
    assert events[0]["error"]["code"] == "prompt_too_long"
    assert "32" in events[0]["error"]["message"]


def test_queue_full_duplicate_and_stored_answer(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service(queue_size=1, max_batch=1)  # one running, one queued
    running = results_topic(service, "long-a")
    probe.subscribe(running)
    probe.publish(
        service.topics.jobs, {"id": "long-a", "messages": LONG, "stream": True, "max_tokens": 200}
    )
    wait_for_event(probe, running, "delta")  # long-a is running, the queue is empty
    queued = ask_no_wait(probe, service, {"id": "long-b", "messages": CAPITAL, "max_tokens": 4})
    assert probe.next(30, queued).json()["event"] == "accepted"
    refused = ask(probe, service, {"id": "long-c", "messages": CAPITAL})
    assert refused[0]["error"]["code"] == "queue_full"
    duplicate = ask(probe, service, {"id": "long-b", "messages": CAPITAL})
    assert duplicate[0]["error"]["code"] == "duplicate"
    # The broker sending long-b again (DUP: our PUBACK was lost) is not a second request: no
    # `duplicate` error, the job's one answer follows.
    redelivery = json.dumps({"id": "long-b", "messages": CAPITAL, "max_tokens": 4}).encode()
    service.handle_message(Incoming(service.topics.jobs, redelivery, None, None, redelivered=True))
    probe.publish(service.topics.cancel, {"id": "long-a"})
    assert wait_for_event(probe, running, "done")["finish_reason"] == "cancelled"
    first = probe.next(30, queued).json()
    assert first["event"] == "done"
    # Asked again once answered: the stored answer, identical, not recomputed.
    again = ask(probe, service, {"id": "long-b", "messages": CAPITAL, "max_tokens": 4})
    assert again == [first]


def ask_no_wait(probe: MqttProbe, service: AgentService, payload: dict[str, Any]) -> str:
    topic = results_topic(service, payload["id"])
    probe.subscribe(topic)
    probe.publish(service.topics.jobs, payload)
    return topic


def test_cancel_a_queued_job_and_deadline(agent_service: ServiceFactory, probe: MqttProbe) -> None:
    service = agent_service(max_batch=1)
    running = ask_no_wait(
        probe, service, {"id": "busy", "messages": LONG, "stream": True, "max_tokens": 200}
    )
    wait_for_event(probe, running, "delta")
    queued = ask_no_wait(probe, service, {"id": "waiting", "messages": CAPITAL})
    late = ask_no_wait(probe, service, {"id": "late", "messages": CAPITAL, "deadline_ms": 50})
    assert probe.next(30, queued).json()["event"] == "accepted"
    probe.publish(service.topics.cancel, {"id": "waiting"})
    cancelled = wait_for_event(probe, queued, "done")
    assert cancelled["finish_reason"] == "cancelled" and cancelled["text"] == ""
    assert probe.next(30, late).json()["event"] == "accepted"
    time.sleep(0.1)  # "late" has now waited past its 50 ms deadline behind "busy"
    probe.publish(service.topics.cancel, {"id": "busy"})
    assert wait_for_event(probe, running, "done")["finish_reason"] == "cancelled"
    expired = wait_for_event(probe, late, "done")
    assert expired["finish_reason"] == "deadline"
    assert expired["usage"]["completion_tokens"] == 0


class FailingBackend:
    """Wraps the real backend and fails on the third decode step, as a GPU fault would: tests
    that the agent answers `engine_error` and carries on. (A failure injected on purpose.)"""

    def __init__(self, inner: Backend[Any]) -> None:
        self.inner = inner
        self.info: BackendInfo = inner.info
        self.fail_next = True
        self._steps = 0

    def new_state(self, batch_size: int, expected_length: int = 0) -> Any:
        self._steps = 0
        return self.inner.new_state(batch_size, expected_length)

    def prefill(self, state: Any, input_ids: TokenIds) -> Logits:
        return self.inner.prefill(state, input_ids)

    def decode(self, state: Any, token_ids: TokenIds) -> Logits:
        self._steps += 1
        if self.fail_next and self._steps == 3:
            self.fail_next = False
            raise EngineError("injected failure: device lost")
        return self.inner.decode(state, token_ids)

    def close(self) -> None:
        self.inner.close()


def test_engine_error_is_reported_and_the_agent_carries_on(
    agent_service: ServiceFactory, probe: MqttProbe, loaded_model: LoadedModel
) -> None:
    service = agent_service(backend=FailingBackend(loaded_model.backend))
    failed = ask(probe, service, {"id": "gpu-1", "messages": CAPITAL, "stream": True})
    assert failed[-1]["error"]["code"] == "engine_error"
    assert "device lost" in failed[-1]["error"]["message"]
    # Not stored as an answer: the same id may be retried, and now succeeds.
    retried = ask(probe, service, {"id": "gpu-1", "messages": CAPITAL})
    assert retried[-1]["event"] == "done" and "Paris" in retried[-1]["text"]


def test_shutting_down_refuses_queued_jobs_and_finishes_the_running_one(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service(max_batch=1)
    running = ask_no_wait(
        probe, service, {"id": "last", "messages": LONG, "stream": True, "max_tokens": 24}
    )
    wait_for_event(probe, running, "delta")
    queued = ask_no_wait(probe, service, {"id": "next", "messages": CAPITAL})
    assert probe.next(30, queued).json()["event"] == "accepted"
    stopper = threading.Thread(target=service.shutdown)
    stopper.start()
    refused = wait_for_event(probe, queued, "error")
    assert refused["error"]["code"] == "shutting_down"
    done = wait_for_event(probe, running, "done")
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 24
    stopper.join(30)


def hostile_payloads(count: int) -> list[bytes]:
    rng = random.Random(1234)
    fixed: list[bytes] = [
        b"",
        b"\x00",
        b"\xff\xfe\xfd",
        b"\xc3\x28",
        b"null",
        b"[]",
        b"42",
        b'"string"',
        b"{",
        b'{"id": "h", "prompt": "x", "max_tokens": 1e999}',
        b'{"id": "h", "prompt": "x", "max_tokens": 99999999999999999999999999}',
        b'{"id": "h", "prompt": "x", "temperature": -0.0001}',
        b'{"id": "h", "prompt": "x", "top_k": 1.5}',
        b'{"id": "h", "prompt": "x", "unknown": {"deep": [1, 2, 3]}}',
        b'{"id": "h", "prompt": {"nested": "object"}}',
        b'{"id": "h", "messages": [{"role": "user", "content": 7}]}',
        b'{"id": "h", "messages": [{"role": "user", "content": "x", "name": "n"}]}',
        b'{"id": "' + b"a" * 500 + b'", "prompt": "x"}',
        b'{"id": "../../etc", "prompt": "x"}',
        b'{"id": "#", "prompt": "x"}',
        b"[" * 5000 + b"]" * 5000,
        json.dumps({"id": "h", "prompt": "x" * 300_000}).encode(),
    ]
    keys = ["id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed",
            "stop", "stream", "priority", "deadline_ms", "extra"]  # fmt: skip
    values: list[Any] = [None, True, -1, 0, 2**70, 1e308, -1e308, "", "x", [], {}, [1], {"a": 1}]
    while len(fixed) < count:
        body = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(1, 5))}
        body.setdefault("id", f"h{len(fixed)}")
        if rng.random() < 0.3:
            body["id"] = rng.choice(values)
        raw = json.dumps(body).encode()
        if rng.random() < 0.2:
            raw = raw[: rng.randint(0, len(raw))] + bytes([rng.randint(0x80, 0xFF)])
        if _is_valid_job(raw):
            continue  # keep only refusals: a valid job here would just run for seconds
        fixed.append(raw)
    return fixed[:count]


def _is_valid_job(raw: bytes) -> bool:
    try:
        parse_job(raw, RequestLimits())
    except InvalidPayload:
        return False
    return True


def test_agent_survives_200_hostile_payloads(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service()
    probe.subscribe(f"{service.topics.prefix}/{service.config.device_id}/results/#")
    payloads = hostile_payloads(200)
    for payload in payloads:
        probe.client.publish(service.topics.jobs, payload, qos=1)
    answered = 0
    errors: list[dict[str, Any]] = []
    while answered < len(payloads):
        event = probe.next(30).json()
        answered += event["event"] in ("error", "done")
        if event["event"] == "error":
            errors.append(event)
            assert event["error"]["code"] in ("invalid_json", "invalid_request")
            assert isinstance(event["error"]["message"], str) and event["error"]["message"]
    assert len(errors) == len(payloads)
    events = ask(probe, service, {"id": "after-the-storm", "messages": CAPITAL})
    assert events[-1]["event"] == "done" and "Paris" in events[-1]["text"]


def test_greedy_matches_the_bundle_golden_tokens(loaded_model: LoadedModel) -> None:
    from agent.canary import check_golden

    assert check_golden(loaded_model.bundle.path, loaded_model.backend, loaded_model.codec) == []


def test_decode_logits_match_a_full_recompute(loaded_model: LoadedModel) -> None:
    """The KV cache path gives the same next-token logits as running the whole sequence again."""
    backend = loaded_model.backend
    ids = loaded_model.codec.encode_messages(CAPITAL)
    state = backend.new_state(1)
    backend.prefill(state, np.asarray([ids[:-1]], dtype=np.int64))
    cached = backend.decode(state, np.asarray([ids[-1]], dtype=np.int64))
    fresh = backend.prefill(backend.new_state(1), np.asarray([ids], dtype=np.int64))
    np.testing.assert_allclose(cached, fresh, atol=1e-3)


def test_concurrent_jobs_are_batched_and_answer_as_alone(
    agent_service: ServiceFactory, probe: MqttProbe
) -> None:
    service = agent_service(max_batch=4)
    questions = ["What is the capital of France?", "Name a primary color.", "What is 2 plus 2?"]
    alone = []
    for i, question in enumerate(questions):
        messages = [{"role": "user", "content": question}]
        alone.append(ask(probe, service, {"id": f"solo-{i}", "messages": messages})[-1]["text"])
    topics = [
        ask_no_wait(
            probe,
            service,
            {"id": f"together-{i}", "messages": [{"role": "user", "content": q}], "stream": True},
        )
        for i, q in enumerate(questions)
    ]
    for topic, expected in zip(topics, alone, strict=True):
        events = probe.events_until_final(topic)
        assert events[-1]["text"] == expected
        assert "".join(e["text"] for e in events if e["event"] == "delta") == expected

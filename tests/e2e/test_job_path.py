"""The job path's promises, on the real model and a real broker: a fault stays with its job, a
stuck disk does not hold running jobs' deltas, and a job queued across a model swap is encoded for
the model that answers it."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, JobsConfig, MqttConfig
from agent.contract.bundle import CHAT_TEMPLATE_FILE
from agent.generation import GenerationRequest, generate
from agent.runtime import LoadedModel
from agent.service import AgentService
from agent.text import TextCodec
from tests.conftest import Broker, MqttProbe, unique_device

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of copper.",
    "Explain what a transformer is in one sentence.",
]


@pytest.fixture
def services(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., AgentService]]:
    started: list[AgentService] = []

    def start(model: LoadedModel, **jobs: Any) -> AgentService:
        config = AgentConfig(
            device_id=unique_device(),
            state_dir=tmp_path / f"state-{len(started)}",
            mqtt=MqttConfig(host=broker.host, port=broker.port),
            jobs=JobsConfig(**jobs),
        )
        service = AgentService(config, model)
        started.append(service)
        return service

    yield start
    for service in started:
        service.shutdown(grace_s=30)


def job(job_id: str, content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }


def alone(model: LoadedModel, payload: dict[str, Any]) -> str:
    """The answer of `payload` run by itself, greedy, on `model`."""
    ids = model.codec.encode_messages(payload["messages"])
    return generate(model.backend, model.codec, GenerationRequest(ids, payload["max_tokens"])).text


class BrokenStream:
    """A detokenizer stream that breaks after `after` tokens (a bug in one row's bookkeeping)."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner = inner
        self.after = after
        self.pushed = 0

    def push(self, token: int) -> str:
        self.pushed += 1
        if self.pushed > self.after:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken byte in this row")
        return str(self.inner.push(token))

    def flush(self) -> str:
        return str(self.inner.flush())


class OneBrokenRow:
    """The real codec; the `broken`-th stream it makes (one job's) breaks after a few tokens."""

    def __init__(self, inner: TextCodec, broken: int) -> None:
        self._inner = inner
        self._broken = broken
        self._made = 0
        self._lock = threading.Lock()

    def stream(self) -> Any:
        with self._lock:
            self._made += 1
            made = self._made
        inner = self._inner.stream()
        return BrokenStream(inner, after=3) if made == self._broken else inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_one_failing_row_in_a_batch_of_four_fails_alone(
    loaded_model: LoadedModel, services: Callable[..., AgentService], probe: MqttProbe
) -> None:
    payloads = [job(f"row-{i}", text, 24, stream=True) for i, text in enumerate(PROMPTS)]
    expected = {p["id"]: alone(loaded_model, p) for p in payloads}
    broken = replace(loaded_model, codec=OneBrokenRow(loaded_model.codec, broken=2))  # type: ignore[arg-type]
    service = services(broken, max_batch=4)
    service.start()
    assert service.link.wait_connected(10)
    topics = {p["id"]: service.topics.results(p["id"]) for p in payloads}
    for topic in topics.values():
        probe.subscribe(topic)
    for payload in payloads:
        probe.publish(service.topics.jobs, payload)
    finals: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    deadline = time.monotonic() + 120
    while len(finals) < len(payloads):
        message = probe.next(max(0.1, deadline - time.monotonic()))
        event = message.json()
        if event["event"] in ("done", "error"):
            finals[event["id"]] = event
            order.append(event["id"])
    failed = [i for i, e in finals.items() if e["event"] == "error"]
    assert len(failed) == 1, finals
    error = finals[failed[0]]["error"]
    assert error["code"] == "engine_error" and "UnicodeDecodeError" in error["message"]
    # The others ran on after the fault, in the same batch, and answered exactly as alone.
    assert order[0] == failed[0], order
    for job_id, event in finals.items():
        if job_id != failed[0]:
            assert event["event"] == "done" and event["text"] == expected[job_id], job_id
    # The agent goes on taking jobs.
    again = job("after", PROMPTS[0], 8)
    probe.subscribe(service.topics.results("after"))
    probe.publish(service.topics.jobs, again)
    events = probe.events_until_final(service.topics.results("after"), 60)
    assert events[-1]["event"] == "done" and events[-1]["text"] == alone(loaded_model, again)


class StuckDisk:
    """Holds every journal write of `journal` until `free()`: a disk whose fsync hangs."""

    WRITES = ("record_accepted", "record_started", "record_done", "record_failed", "forget")

    def __init__(self, journal: Any) -> None:
        self.free_event = threading.Event()
        self.free_event.set()
        self.waiting: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        for name in self.WRITES:
            setattr(journal, name, self._held(name, getattr(journal, name)))

    def _held(self, name: str, write: Callable[..., None]) -> Callable[..., None]:
        def held(job_id: str, *args: Any) -> None:
            with self._lock:
                self.waiting.append((name, job_id))
            self.free_event.wait(120)
            with self._lock:
                self.waiting.remove((name, job_id))
            write(job_id, *args)

        return held

    def stick(self) -> None:
        self.free_event.clear()

    def free(self) -> None:
        self.free_event.set()

    def is_waiting(self, name: str, job_id: str) -> bool:
        with self._lock:
            return (name, job_id) in self.waiting


def test_a_stuck_journal_disk_does_not_hold_a_running_jobs_deltas(
    loaded_model: LoadedModel, services: Callable[..., AgentService], probe: MqttProbe
) -> None:
    service = services(loaded_model, max_batch=4)
    assert service.journal is not None
    disk = StuckDisk(service.journal)
    service.start()
    assert service.link.wait_connected(10)
    running = job("streaming", PROMPTS[1], 64, stream=True)
    expected = alone(loaded_model, running)
    topic = service.topics.results("streaming")
    probe.subscribe(topic)
    probe.publish(service.topics.jobs, running)
    first = [probe.next(60, topic).json() for _ in range(2)]
    assert [e["event"] for e in first] == ["accepted", "delta"], first
    disk.stick()
    # Two new jobs arrive: their admission waits on the stuck disk (the intake thread holds).
    for name in ("waits-1", "waits-2"):
        probe.subscribe(service.topics.results(name))
        probe.publish(service.topics.jobs, job(name, PROMPTS[0], 8))
    texts = [first[1]["text"]]
    deadline = time.monotonic() + 60
    while "".join(texts) != expected:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"deltas stopped while the disk was stuck: {''.join(texts)!r}"
        event = probe.next(remaining, topic).json()
        assert event["event"] == "delta", event  # the answer itself waits for its record
        texts.append(event["text"])
    assert disk.is_waiting("record_accepted", "waits-1")  # it really was held all along
    disk.free()
    done = probe.next(60, topic).json()
    assert done["event"] == "done" and done["text"] == expected
    for name in ("waits-1", "waits-2"):
        events = probe.events_until_final(service.topics.results(name), 60)
        assert [e["event"] for e in events] == ["accepted", "done"], events


def codec_with_template(model: LoadedModel, directory: Path, system: str) -> TextCodec:
    """The bundle's tokenizer with a chat template that always starts with `system`: another
    bundle's tokenizer, as far as the ids of a chat job go."""
    directory.mkdir()
    bundle = model.bundle.path
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundle / name, directory / name)
    template = (
        "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}"
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (directory / CHAT_TEMPLATE_FILE).write_text(template)
    return TextCodec(directory, sorted(model.codec.eos_token_ids))


def test_a_job_queued_across_a_swap_is_encoded_for_the_new_model(
    loaded_model: LoadedModel,
    services: Callable[..., AgentService],
    probe: MqttProbe,
    tmp_path: Path,
) -> None:
    system = "You answer every question as a pirate would, in one short sentence."
    updated = replace(
        loaded_model, codec=codec_with_template(loaded_model, tmp_path / "updated", system)
    )
    queued = job("queued", PROMPTS[0], 12)
    old_ids = loaded_model.codec.encode_messages(queued["messages"])
    new_ids = updated.codec.encode_messages(queued["messages"])
    assert len(new_ids) != len(old_ids)  # the two tokenizers really disagree on this job
    expected = generate(updated.backend, updated.codec, GenerationRequest(new_ids, 12)).text
    service = services(loaded_model, max_batch=1)
    service.start()
    assert service.link.wait_connected(10)
    busy, waiting = service.topics.results("busy"), service.topics.results("queued")
    probe.subscribe(busy)
    probe.subscribe(waiting)
    probe.publish(service.topics.jobs, job("busy", PROMPTS[1], 48, stream=True))
    assert [probe.next(60, busy).json()["event"] for _ in range(2)] == ["accepted", "delta"]
    probe.publish(service.topics.jobs, queued)
    assert probe.next(60, waiting).json()["event"] == "accepted"  # encoded by the old tokenizer
    swap = threading.Thread(target=service.activate, args=(updated,))
    swap.start()
    busy_events = probe.events_until_final(busy, 60)
    assert busy_events[-1]["event"] == "done"  # the running job finished on the old model
    answer = probe.events_until_final(waiting, 60)[-1]
    swap.join(30)
    assert not swap.is_alive()
    assert answer["event"] == "done", answer
    assert answer["usage"]["prompt_tokens"] == len(new_ids)
    assert answer["text"] == expected

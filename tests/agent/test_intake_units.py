"""Intake rules at unit level: reserved Response Topics, repeated JSON keys, size caps before
parsing, and the journal's record of delivered answers (a real SQLite file, an old schema)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.jobs import InvalidPayload, RequestLimits, parse_cancel, parse_job
from agent.journal import JOURNAL_FILE, JobJournal
from agent.topics import Topics


@pytest.mark.parametrize(
    "topic",
    [
        "edgellm/orin-01/jobs",
        "edgellm/other/jobs",
        "edgellm/fleet/jobs",
        "edgellm/orin-01/jobs/cancel",
        "edgellm/orin-01/ota",
        "edgellm/orin-01/ota/status",
        "edgellm/other/status",
        "edgellm/other/telemetry",
    ],
)
def test_command_and_report_topics_are_never_reply_topics_even_with_hash(topic: str) -> None:
    topics = Topics("edgellm", "orin-01", ("#",))
    assert not topics.reply_allowed(topic)
    for inbox in ("edgellm/orin-01/results/q-1", "clients/abc/inbox", "edgellm/orin-01/jobs/x"):
        assert topics.reply_allowed(inbox)  # everything else stays allowed by the default


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id": "a", "prompt": "x", "id": "b"}',
        b'{"id": "a", "prompt": "x", "prompt": "y"}',
        b'{"id": "a", "messages": [{"role": "user", "content": "x", "role": "system"}]}',
    ],
)
def test_repeated_keys_are_invalid_json(payload: bytes) -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_job(payload, RequestLimits())
    assert caught.value.job_code == "invalid_json" and "repeats the key" in caught.value.message
    with pytest.raises(InvalidPayload) as cancel:
        parse_cancel(b'{"id": "a", "id": "b"}')
    assert cancel.value.job_code == "invalid_json"


def test_an_oversize_cancel_is_refused_by_size_not_parsed() -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_cancel(b"[" * 100_000)  # parsing would say invalid_json (or recurse)
    assert caught.value.job_code == "invalid_request" and "limit is 1024" in caught.value.message


def test_answers_not_acknowledged_are_listed_until_they_are(tmp_path: Path) -> None:
    journal = JobJournal.in_state_dir(tmp_path)
    for job_id in ("a", "b"):
        journal.record_accepted(job_id, b"{}", f"edgellm/d/results/{job_id}", b"c", 1.0)
        journal.record_done(job_id, {"id": job_id, "event": "done", "text": job_id})
    journal.record_acked("a")
    [unacked] = journal.unacked_answers()
    assert (unacked.job_id, unacked.reply_topic, unacked.correlation_data) == (
        "b",
        "edgellm/d/results/b",
        b"c",
    )
    assert unacked.answer["text"] == "b"
    journal.record_acked("b")
    assert journal.unacked_answers() == []
    journal.close()


def test_a_schema_1_journal_is_upgraded_and_its_answers_count_as_delivered(
    tmp_path: Path,
) -> None:
    db = sqlite3.connect(tmp_path / JOURNAL_FILE, isolation_level=None)
    db.executescript(
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL, request BLOB NOT NULL, reply_topic TEXT NOT NULL,
            correlation BLOB, received_at REAL NOT NULL, started_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0, answered_at REAL, answer TEXT);
        PRAGMA user_version=1;"""
    )
    answer = json.dumps({"id": "old", "event": "done", "text": "x"})
    db.execute(
        "INSERT INTO jobs (job_id, state, request, reply_topic, received_at, answered_at, answer)"
        " VALUES ('old', 'done', x'', 'edgellm/d/results/old', 1e12, 1e12, ?)",
        (answer,),
    )
    db.close()
    journal = JobJournal.in_state_dir(tmp_path)
    assert journal.unacked_answers() == []  # not re-sent after the upgrade
    assert journal.stored_answer("old") == json.loads(answer)
    journal.close()


def test_a_full_intake_answers_jobs_queue_full_at_once_and_keeps_commands_apart() -> None:
    """paho's thread never waits: past the FIFO's capacity a job is refused from a cheap read of
    its id (on its own results topic), a cancel has its own room, and nothing is parsed early."""
    from agent.config import TelemetryConfig
    from agent.intake import Intake, Serving
    from agent.job_queue import JobQueue, ResultStore
    from agent.journal_writer import JournalWriter
    from agent.lifecycle import ActiveIds, JobBook
    from agent.mqtt_link import Incoming
    from agent.telemetry import TelemetryCollector

    refused: list[tuple[str, dict[str, Any]]] = []
    topics = Topics("edgellm", "orin-01")
    book = JobBook(
        ids=ActiveIds(),
        results=ResultStore(4),
        writer=JournalWriter(None, lambda exc: None, lambda: None),
        telemetry=TelemetryCollector(TelemetryConfig()),
        device_id="orin-01",
        refuse=lambda reply, job_id, code, message: None,
    )
    intake = Intake(
        topics=topics,
        limits=RequestLimits(),
        queue=JobQueue(4),
        book=book,
        journal=None,
        serving=Serving(lambda: None, lambda: 0, lambda: True, lambda: None),
        stream=lambda job_id, reply: None,  # type: ignore[arg-type,return-value]
        refuse_payload=lambda reply, payload: refused.append((reply.topic, payload)),
        on_update=None,
        journal_failed=lambda exc: None,
        journal_ok=lambda: None,
        capacity=2,
    )  # not started: everything submitted waits
    for n in range(3):
        payload = json.dumps({"id": f"j-{n}", "prompt": "hi"}).encode()
        intake.submit(Incoming(topics.jobs, payload, None, None))
    intake.submit(Incoming(topics.jobs, b"not json", None, None))
    intake.submit(Incoming(topics.cancel, b'{"id": "j-0"}', None, None))
    assert [(topic, event["id"], event["error"]["code"]) for topic, event in refused] == [
        ("edgellm/orin-01/results/j-2", "j-2", "queue_full"),
        ("edgellm/orin-01/results/_invalid", None, "queue_full"),
    ]
    assert intake._jobs_waiting == 2 and intake._commands_waiting == 1


def test_a_job_whose_start_fails_is_answered_once_and_never_run() -> None:
    """The worker's guard: a transition that raises fails its job; a job whose `started` failed
    must not then be put in the batch as well (it would be answered twice)."""
    from agent.config import JobsConfig, TelemetryConfig
    from agent.job_queue import JobQueue, Reply, ResultStore
    from agent.journal_writer import JournalWriter
    from agent.lifecycle import ActiveIds, ActiveJob, JobBook
    from agent.telemetry import TelemetryCollector
    from agent.worker import ServingModel, Worker

    sent: list[dict[str, Any]] = []

    class Stream:
        def event(self, payload: dict[str, Any], on_ack: Any = None) -> None:
            sent.append(payload)

        def delta(self, text: str) -> None:
            raise AssertionError("a job that never ran streamed text")

    class Batch:
        def __init__(self) -> None:
            self.submitted: list[Any] = []

        def submit(self, run: Any, key: Any) -> None:
            self.submitted.append(key)

    book = JobBook(
        ids=ActiveIds(),
        results=ResultStore(4),
        writer=JournalWriter(None, lambda exc: None, lambda: None),
        telemetry=TelemetryCollector(TelemetryConfig()),
        device_id="orin-01",
        refuse=lambda reply, job_id, code, message: None,
    )
    request = parse_job(b'{"id": "j-1", "prompt": "hi"}', RequestLimits())
    job = ActiveJob(book, request, [1, 2], Reply("r"), Stream(), 0)  # type: ignore[arg-type]

    def broken_start() -> None:
        raise OSError("the telemetry reader broke")

    job.started = broken_start  # type: ignore[method-assign]
    worker = Worker(JobQueue(4), ServingModel(None), JobsConfig(), watchdog=None, on_swapped=print)
    batch = Batch()
    worker._start(job, batch, None)  # type: ignore[arg-type]
    assert batch.submitted == []
    assert [(e["event"], e["error"]["code"]) for e in sent] == [("error", "engine_error")]
    assert "the telemetry reader broke" in sent[0]["error"]["message"]
    assert book.failed_count == 1 and book.done_count == 0

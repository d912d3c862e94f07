"""The state dir's file system fills up under a running agent (a 1 MB tmpfs, then a filler file):
jobs are refused with a message that says the disk is full, the retained status carries
`journal_error`, the journal is not corrupted, and once space is free the agent answers again."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.journal import JOURNAL_FILE
from tests.conftest import Broker, fill, mounted_tmpfs, start_agent
from tests.reliability.conftest import FAST_RECONNECT, Collector, job, stop_agent

pytestmark = [pytest.mark.slow, pytest.mark.session_bundle]


@pytest.fixture
def tiny_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs mounted where the agent keeps its state."""
    with mounted_tmpfs(tmp_path / "agent" / "state", "1m") as state:
        yield state


def test_a_full_state_disk_refuses_jobs_clearly_and_recovers(
    default_bundle: Path,
    broker: Broker,
    collector_for: object,
    tiny_state_dir: Path,
) -> None:
    collector: Collector = collector_for(broker, persistent=False)  # type: ignore[operator]
    workdir = tiny_state_dir.parent
    agent = start_agent(default_bundle, broker, workdir, config=FAST_RECONNECT)
    device = agent.device
    jobs_topic = f"edgellm/{device}/jobs"
    try:
        collector.wait_status(device, "online", 60)
        collector.publish(jobs_topic, job("before-full", max_tokens=2))
        collector.wait_final(["before-full"], 60)
        assert collector.finals("before-full")[0]["event"] == "done"

        filler = fill(tiny_state_dir)
        refused: dict[str, str] = {}
        sent: list[str] = []
        for n in range(40):  # SQLite may still reuse WAL pages it has: a few may get through
            job_id = f"full-{n}"
            sent.append(job_id)
            collector.publish(jobs_topic, job(job_id, max_tokens=2))
            collector.wait_final([job_id], 60)
            final = collector.finals(job_id)[0]
            if final["event"] == "error":
                refused[job_id] = final["error"]["message"]
                if len(refused) >= 3:
                    break
        assert refused, "no job was refused although the state disk is full"
        for job_id, message in refused.items():
            final = collector.finals(job_id)[0]
            assert final["error"]["code"] == "engine_error", final
            assert "is full" in message and "free space" in message, message
        for job_id in sent:  # every job got exactly one final answer, refused or done
            assert len(collector.finals(job_id)) == 1, collector.events[job_id]
            if job_id not in refused:
                assert collector.finals(job_id)[0]["event"] == "done"
        statuses = [s for _, topic, s in collector.status if topic.endswith(f"/{device}/status")]
        flagged = [s for s in statuses if s.get("error", {}).get("code") == "journal_error"]
        assert flagged and flagged[-1]["state"] == "online", statuses[-1]
        assert "is full" in flagged[-1]["error"]["message"]
        assert agent.process.poll() is None

        filler.unlink()  # space again: the agent takes jobs without a restart
        collector.publish(jobs_topic, job("after-free", max_tokens=2))
        collector.wait_final(["after-free"], 60)
        assert collector.finals("after-free")[0]["event"] == "done"
    finally:
        stop_agent(agent)
    assert agent.process.returncode == 0
    assert "Traceback" not in agent.log()

    # Not corrupted: SQLite's own check, and a restart that neither moves the journal aside
    # nor re-runs a job that was refused.
    journal = tiny_state_dir / JOURNAL_FILE
    with sqlite3.connect(journal) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        states = dict(db.execute("SELECT job_id, state FROM jobs").fetchall())
    assert states["before-full"] == "done" and states["after-free"] == "done"
    assert not set(refused) & set(states), "a refused job is still in the journal"
    agent = start_agent(default_bundle, broker, workdir, device=device, config=FAST_RECONNECT)
    try:
        collector.wait_status(device, "online", 60, after=collector.status[-1][0])
        collector.publish(jobs_topic, job("after-restart", max_tokens=2))
        collector.wait_final(["after-restart"], 60)
        assert collector.finals("after-restart")[0]["event"] == "done"
    finally:
        stop_agent(agent)
    log = agent.log()
    assert "was damaged" not in log
    print(log.count("re-running journaled job"), "journaled jobs re-run after the restart")


def test_the_status_error_clears_once_the_journal_writes_again(
    default_bundle: Path,
    broker: Broker,
    collector_for: object,
    tiny_state_dir: Path,
) -> None:
    collector: Collector = collector_for(broker, persistent=False)  # type: ignore[operator]
    agent = start_agent(default_bundle, broker, tiny_state_dir.parent, config=FAST_RECONNECT)
    device = agent.device
    jobs_topic = f"edgellm/{device}/jobs"
    try:
        collector.wait_status(device, "online", 60)
        filler = fill(tiny_state_dir)
        for n in range(40):
            collector.publish(jobs_topic, job(f"full-{n}", max_tokens=2))
            collector.wait_final([f"full-{n}"], 60)
            if collector.finals(f"full-{n}")[0]["event"] == "error":
                break
        filler.unlink()
        collector.publish(jobs_topic, job("after-free", max_tokens=2))
        collector.wait_final(["after-free"], 60)
        assert collector.finals("after-free")[0]["event"] == "done"

        def healthy() -> bool:
            mine = [s for _, t, s in collector.status if t == f"edgellm/{device}/status"]
            return "error" not in mine[-1]

        collector.wait(healthy, 5, "a status without the journal error")
    finally:
        stop_agent(agent)

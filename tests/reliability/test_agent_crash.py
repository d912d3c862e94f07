"""The agent dies with SIGKILL in the middle of generating: after a restart with the same state
dir, the journaled jobs are answered, and a job sent while it was down arrives from its broker
session."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import Broker, start_agent
from tests.reliability.conftest import FAST_RECONNECT, Collector, job, stop_agent

pytestmark = [pytest.mark.slow, pytest.mark.session_bundle]


def test_killed_mid_generation_then_restarted_answers_the_journaled_jobs(
    default_bundle: Path, broker: Broker, collector_for: object, tmp_path: Path
) -> None:
    collector: Collector = collector_for(broker, persistent=False)  # type: ignore[operator]
    config = FAST_RECONNECT + "[jobs]\nmax_batch = 1\n"  # one runs, the next waits in the queue
    workdir = tmp_path / "agent"
    agent = start_agent(default_bundle, broker, workdir, config=config)
    device = agent.device
    jobs_topic = f"edgellm/{device}/jobs"
    try:
        collector.wait_status(device, "online", 60)
        collector.publish(jobs_topic, job("running", max_tokens=48, stream=True))
        collector.publish(jobs_topic, job("queued", max_tokens=8))
        collector.wait(lambda: collector.count("running", "delta") >= 3, 60, "three deltas")
        assert collector.count("queued", "accepted") == 1
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(10)
        killed_at = collector.wait_status(device, "offline", 30)  # the Last Will
        assert collector.finals("running") == [] and collector.finals("queued") == []
        # Sent while the agent is down: its broker session (clean_start False, expiry 1 h)
        # keeps the job until it is back.
        collector.publish(jobs_topic, job("while-down", max_tokens=4))
        agent = start_agent(default_bundle, broker, workdir, device=device, config=config)
        collector.wait_status(device, "online", 60, after=killed_at)
        collector.wait_final(["running", "queued", "while-down"], 120)
        for job_id in ("running", "queued", "while-down"):
            finals = collector.finals(job_id)
            assert [e["event"] for e in finals] == ["done"], (job_id, finals)
        assert collector.finals("running")[0]["finish_reason"] == "length"
        log = agent.log()
        assert "re-running journaled job running" in log
        assert "re-running journaled job queued" in log
    finally:
        stop_agent(agent)
    assert agent.process.returncode == 0

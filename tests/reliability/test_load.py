"""A burst of 1,000 jobs at one agent: the bounded queue takes what it can, every other job is
refused with `queue_full` at once, nothing goes unanswered, and memory stays bounded."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import start_agent
from tests.reliability.conftest import (
    FAST_RECONNECT,
    Collector,
    OwnBroker,
    job,
    peak_rss_mb,
    stop_agent,
)

pytestmark = [pytest.mark.slow, pytest.mark.session_bundle]

BURST = 1000
# The agent's RSS is ~0.6-0.7 GB with SmolLM2-135M loaded (fp32 weights + ONNX Runtime arenas);
# a leak per job (payloads, events, journal rows) over 1,000 jobs would show well above this.
PEAK_RSS_LIMIT_MB = 1500
GROWTH_LIMIT_MB = 300


def test_a_burst_of_1000_jobs_is_answered_or_refused_and_memory_stays_bounded(
    default_bundle: Path, own_broker: OwnBroker, collector_for: object, tmp_path: Path
) -> None:
    collector: Collector = collector_for(own_broker.broker)  # type: ignore[operator]
    agent = start_agent(
        default_bundle, own_broker.broker, tmp_path / "agent", config=FAST_RECONNECT
    )
    try:
        collector.wait_status(agent.device, "online", 60)
        # Warm up (first-run allocations are not what is being measured), then the baseline.
        collector.publish(f"edgellm/{agent.device}/jobs", job("warm-up", max_tokens=2))
        collector.wait_final(["warm-up"], 60)
        idle_mb = peak_rss_mb(agent.process.pid)
        ids = [f"burst-{n:04d}" for n in range(BURST)]
        topic = f"edgellm/{agent.device}/jobs"
        started = time.monotonic()
        for job_id in ids:  # as fast as paho sends them: no waiting for each PUBACK
            collector.client.publish(topic, json.dumps(job(job_id, max_tokens=2)), qos=1)
        collector.wait_final(ids, 240)
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # anything late (a second final for some id) would arrive now
        peak_mb = peak_rss_mb(agent.process.pid)
        assert agent.process.poll() is None

        outcome: Counter[str] = Counter()
        for job_id in ids:
            events = collector.events[job_id]
            finals = collector.finals(job_id)
            assert len(finals) == 1, (job_id, events)
            final = finals[0]
            accepted = any(e["event"] == "accepted" for e in events)
            if accepted:
                assert final["event"] == "done", (job_id, events)
                outcome["done"] += 1
            else:
                assert final["event"] == "error", (job_id, events)
                assert final["error"]["code"] == "queue_full", final
                outcome["queue_full"] += 1
        queue_size = 32
        assert outcome["done"] >= queue_size, outcome  # at least a full queue was taken
        assert outcome["done"] + outcome["queue_full"] == BURST
        print(
            f"\nburst of {BURST}: {outcome['done']} accepted and answered, "
            f"{outcome['queue_full']} refused queue_full, 0 unanswered, in {elapsed:.1f} s; "
            f"agent peak RSS (VmHWM) {peak_mb:.0f} MB (after warm-up {idle_mb:.0f} MB)"
        )
        assert peak_mb < PEAK_RSS_LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
        assert peak_mb - idle_mb < GROWTH_LIMIT_MB, f"grew {peak_mb - idle_mb:.0f} MB"
    finally:
        stop_agent(agent)
    assert agent.process.returncode == 0

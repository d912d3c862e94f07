"""The broker fails under a working agent: restarted with jobs in flight, frozen then resumed.
Every job is answered once the broker is back, and none is run twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import start_agent
from tests.reliability.conftest import (
    FAST_RECONNECT,
    Collector,
    OwnBroker,
    job,
    stop_agent,
)

pytestmark = [pytest.mark.slow, pytest.mark.session_bundle]


def assert_answered_once(collector: Collector, ids: list[str]) -> None:
    """One `done` per job. A QoS 1 redelivery of the same `done` (byte for byte: the broker did
    not see our PUBACK) is the transport's at-least-once, not a second run; a second, different
    `done` would be."""
    for job_id in ids:
        dones = [e for e in collector.events[job_id] if e.get("event") == "done"]
        distinct = {json.dumps(e, sort_keys=True) for e in dones}
        assert len(distinct) == 1, f"{job_id}: {len(distinct)} different done events: {dones}"
        if len(dones) > 1:
            print(f"{job_id}: the same done delivered {len(dones)} times (QoS 1 redelivery)")
        errors = [e for e in collector.events[job_id] if e.get("event") == "error"]
        assert errors == [], f"{job_id}: {errors}"


def test_broker_restarted_with_jobs_in_flight(
    default_bundle: Path, own_broker: OwnBroker, collector_for: object, tmp_path: Path
) -> None:
    collector: Collector = collector_for(own_broker.broker)  # type: ignore[operator]
    agent = start_agent(
        default_bundle, own_broker.broker, tmp_path / "agent", config=FAST_RECONNECT
    )
    try:
        collector.wait_status(agent.device, "online", 60)
        jobs_topic = f"edgellm/{agent.device}/jobs"
        before = [f"before-{n}" for n in range(16)]
        for job_id in before:
            collector.publish(jobs_topic, job(job_id, max_tokens=24))
        collector.wait(
            lambda: all(collector.count(i, "accepted") for i in before), 30, "every accepted"
        )
        own_broker.stop()  # jobs queued and running in the agent; answers pile up in paho
        in_flight = [i for i in before if not collector.finals(i)]
        assert in_flight, "every job was answered before the broker stopped: nothing in flight"
        # Sent while the broker is down: paho holds them and sends them on reconnecting.
        during = [f"during-{n}" for n in range(4)]
        for job_id in during:
            collector.client.publish(jobs_topic, json.dumps(job(job_id, max_tokens=4)), qos=1)
        own_broker.start()
        collector.wait_final(before + during, 120)
        after = [f"after-{n}" for n in range(4)]
        for job_id in after:
            collector.publish(jobs_topic, job(job_id, max_tokens=4))
        collector.wait_final(after, 60)
        assert_answered_once(collector, before + during + after)
        assert agent.process.poll() is None
        assert "re-running journaled job" not in agent.log()
    finally:
        stop_agent(agent)
    assert agent.process.returncode == 0


def test_broker_frozen_then_resumed(
    default_bundle: Path, own_broker: OwnBroker, collector_for: object, tmp_path: Path
) -> None:
    """SIGSTOP for 8 s: longer than 1.5 x the agent's 2 s keepalive, so the agent gives the
    connection up and reconnects once the broker answers again (a hung broker, or a network
    that black-holes packets, looks exactly like this)."""
    collector: Collector = collector_for(own_broker.broker)  # type: ignore[operator]
    config = FAST_RECONNECT + "keepalive_s = 2\n"
    agent = start_agent(default_bundle, own_broker.broker, tmp_path / "agent", config=config)
    try:
        collector.wait_status(agent.device, "online", 60)
        jobs_topic = f"edgellm/{agent.device}/jobs"
        ids = [f"frozen-{n}" for n in range(12)]
        for job_id in ids:
            collector.publish(jobs_topic, job(job_id, max_tokens=24))
        collector.wait(lambda: all(collector.count(i, "accepted") for i in ids), 30, "accepted")
        own_broker.freeze()
        time.sleep(8)
        own_broker.thaw()
        assert [i for i in ids if not collector.finals(i)], "nothing was in flight"  # before thaw
        collector.wait_final(ids, 120)
        later = [f"thawed-{n}" for n in range(3)]
        for job_id in later:
            collector.publish(jobs_topic, job(job_id, max_tokens=4))
        collector.wait_final(later, 60)
        assert_answered_once(collector, ids + later)
        assert "disconnected from the broker" in agent.log()  # the keepalive did notice
        assert agent.process.poll() is None
    finally:
        stop_agent(agent)
    assert agent.process.returncode == 0

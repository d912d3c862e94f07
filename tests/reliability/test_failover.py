"""Fleet failover: two agents share the fleet's jobs; one dies with jobs queued in it; the other
answers them. Measured: the time from the death to the first answer of a job that was queued at
the dead agent (the brief promises 30 s; the aim is under 10 s).

What makes it work with Mosquitto 2.0 is the sender resubmitting (fleet/resubmit.py): the dead
agent had already acknowledged its jobs, so the broker has nothing to redeliver, and its
persistent session keeps receiving a share of new fleet jobs (asserted below)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import MqttConfig
from fleet.resubmit import FleetSubmitter, ResubmitPolicy
from tests.conftest import AgentProcess, start_agent
from tests.reliability.conftest import (
    FAST_RECONNECT,
    STORY,
    Collector,
    OwnBroker,
    job,
    stop_agent,
)

pytestmark = [pytest.mark.slow, pytest.mark.session_bundle]

PROMISED_S = 30.0
# Two jobs decode together, the rest wait in the agent's queue; a short keepalive so that the
# broker notices a silent (frozen, unplugged) agent: 1.5 x keepalive, plus up to ~5 s more,
# measured (Mosquitto does not check keepalives continuously).
KEEPALIVE_S = 2


def two_agents(bundle: Path, own_broker: OwnBroker, tmp_path: Path) -> list[AgentProcess]:
    config = FAST_RECONNECT + f"keepalive_s = {KEEPALIVE_S}\n[jobs]\nmax_batch = 2\n"
    return [
        start_agent(bundle, own_broker.broker, tmp_path / name, config=config)
        for name in ("a", "b")
    ]


def jobs_waiting_at_victim(
    submitter: FleetSubmitter,
    collector: Collector,
    agents: list[AgentProcess],
    count: int,
    prefix: str,
) -> tuple[list[str], list[str]]:
    """Once both agents are online, `count` fleet jobs; returns them all and those queued (not
    yet answered) at the first agent, the victim: at least 3 of them."""
    for agent in agents:
        collector.wait_status(agent.device, "online", 60)
    submitter.start()
    ids = [submitter.submit(job(f"{prefix}-{n}", max_tokens=32)) for n in range(count)]
    deadline = time.monotonic() + 30
    while any(submitter.device_of(i) is None for i in ids):
        assert time.monotonic() < deadline, "not every fleet job was accepted"
        time.sleep(0.05)
    victim = agents[0].device
    queued = [
        i for i in ids if submitter.device_of(i) == victim and submitter.history(i)[1] is None
    ]
    assert len(queued) >= 3, f"only {len(queued)} jobs waiting at the victim"
    return ids, queued


def measure(
    submitter: FleetSubmitter, ids: list[str], at_victim: list[str], died: float, victim: str
) -> float:
    finals = submitter.wait(ids, 120)
    assert all(f["event"] == "done" for f in finals.values()), finals
    answered = []
    for job_id in at_victim:
        devices, by, at, sends = submitter.history(job_id)
        assert by != victim and sends >= 2, (job_id, devices, by, sends)
        assert at is not None
        answered.append(at)
    return min(answered) - died


def test_a_killed_agents_fleet_jobs_are_answered_by_the_other(
    default_bundle: Path, own_broker: OwnBroker, collector_for: object, tmp_path: Path
) -> None:
    collector: Collector = collector_for(own_broker.broker)  # type: ignore[operator]
    agents = two_agents(default_bundle, own_broker, tmp_path)
    victim, survivor = agents
    policy = ResubmitPolicy(accept_timeout_s=3.0)
    submitter = FleetSubmitter(MqttConfig(host="127.0.0.1", port=own_broker.port), policy)
    try:
        ids, queued = jobs_waiting_at_victim(submitter, collector, agents, 12, "kill")
        victim.process.send_signal(signal.SIGKILL)
        died = time.monotonic()
        victim.process.wait(10)
        offline = collector.wait_status(victim.device, "offline", 30, after=died)
        # New fleet jobs after the death: Mosquitto still routes some to the dead session.
        later = [submitter.submit(job(f"later-{n}", max_tokens=4)) for n in range(4)]
        recovery = measure(submitter, ids, queued, died, victim.device)
        submitter.wait(later, 60)
        stranded = [r for r in submitter.resubmissions if "no device accepted" in r.reason]
        print(
            f"\nSIGKILL failover: Last Will {offline - died:.2f} s after the kill; {len(queued)} "
            f"jobs queued at the killed agent, the first answered by the other {recovery:.2f} s "
            f"after the kill; {len(stranded)} of 4 later jobs "
            "had been routed to the dead agent's session and were resubmitted after 3 s"
        )
        assert recovery < PROMISED_S
        assert stranded, "Mosquitto no longer routes fleet jobs to a dead member's session?"
        assert all(submitter.history(i)[1] == survivor.device for i in later)
    finally:
        submitter.close()
        for agent in agents:
            stop_agent(agent)


def test_a_frozen_agents_fleet_jobs_are_answered_by_the_other(
    default_bundle: Path, own_broker: OwnBroker, collector_for: object, tmp_path: Path
) -> None:
    """SIGSTOP stands for a power cut or a lost network: no TCP FIN, the broker only notices
    through the keepalive (1.5 x KEEPALIVE_S, checked every few seconds), then publishes the
    Last Will."""
    collector: Collector = collector_for(own_broker.broker)  # type: ignore[operator]
    agents = two_agents(default_bundle, own_broker, tmp_path)
    victim, survivor = agents
    policy = ResubmitPolicy(accept_timeout_s=3.0)
    submitter = FleetSubmitter(MqttConfig(host="127.0.0.1", port=own_broker.port), policy)
    try:
        ids, queued = jobs_waiting_at_victim(submitter, collector, agents, 12, "freeze")
        os.kill(victim.process.pid, signal.SIGSTOP)
        died = time.monotonic()
        offline = collector.wait_status(victim.device, "offline", 30, after=died)
        recovery = measure(submitter, ids, queued, died, victim.device)
        print(
            f"\nfrozen-agent failover: the broker published its Last Will after "
            f"{offline - died:.1f} s (keepalive {KEEPALIVE_S} s); first of {len(queued)} queued "
            f"jobs answered by the other {recovery:.2f} s after the freeze"
        )
        assert recovery < PROMISED_S
    finally:
        submitter.close()
        if victim.process.poll() is None:
            victim.process.kill()  # a stopped process still dies of SIGKILL
            victim.process.wait(10)
        stop_agent(survivor)


def test_edge_fleet_prompt_is_answered_by_the_other_device_when_its_device_dies(
    default_bundle: Path, own_broker: OwnBroker, collector_for: object, tmp_path: Path
) -> None:
    """`edge-fleet prompt --fleet`, as an operator runs it: the device streaming the answer is
    killed after its first delta; the tool says the answer starts over and prints the other
    device's complete answer."""
    collector: Collector = collector_for(own_broker.broker)  # type: ignore[operator]
    agents = two_agents(default_bundle, own_broker, tmp_path)
    cli: subprocess.Popen[str] | None = None
    try:
        for agent in agents:
            collector.wait_status(agent.device, "online", 60)
        cli = subprocess.Popen(
            [sys.executable, "-m", "fleet", "prompt", STORY[0]["content"], "--fleet",
             "--broker", f"127.0.0.1:{own_broker.port}", "--max-tokens", "200",
             "--id", "cli-failover", "--json", "--timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        collector.wait(lambda: collector.count("cli-failover", "delta") > 0, 60, "a first delta")
        first = next(
            topic for _, topic, e in collector.arrivals["cli-failover"] if e["event"] == "delta"
        )
        victim = next(a for a in agents if f"/{a.device}/" in first)
        survivor = next(a for a in agents if a is not victim)
        victim.process.send_signal(signal.SIGKILL)
        out, err = cli.communicate(timeout=180)
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
        for agent in agents:
            if agent.process.poll() is None:
                stop_agent(agent)
    assert cli.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    kinds = [e["event"] for e in events]
    assert "resent" in kinds, kinds
    resent = kinds.index("resent")
    assert events[resent]["device"] == survivor.device
    assert events[-1]["event"] == "done" and events[-1]["device"] == survivor.device
    after = [e["text"] for e in events[resent:] if e["event"] == "delta"]
    assert "".join(after) == events[-1]["text"]  # the survivor's answer, streamed whole

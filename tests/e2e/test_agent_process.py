"""The agent as users run it: `edge-agent run` as a process, `edge-fleet prompt` against it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import Broker, MqttProbe, start_agent, wait_status


def test_status_online_then_offline_after_sigterm(
    default_bundle: Path, broker: Broker, probe: MqttProbe, tmp_path: Path
) -> None:
    # One job at a time, so that a second job is queued (not batched) when SIGTERM arrives.
    agent = start_agent(default_bundle, broker, tmp_path, config="[jobs]\nmax_batch = 1\n")
    try:
        online = wait_status(probe, agent.device, "online")
        assert online["engine"]["backend"] == "onnxruntime"
        assert online["agent_version"] and online["since"]
        # A job in flight and one queued when SIGTERM arrives: the first finishes, the second is
        # refused with `shutting_down` (nothing silently dropped).
        running = f"edgellm/{agent.device}/results/run-1"
        queued = f"edgellm/{agent.device}/results/run-2"
        probe.subscribe(running)
        probe.subscribe(queued)
        story = [{"role": "user", "content": "Tell me a long story."}]
        jobs = f"edgellm/{agent.device}/jobs"
        probe.publish(jobs, {"id": "run-1", "messages": story, "stream": True, "max_tokens": 40})
        assert probe.next(60, running).json()["event"] == "accepted"
        assert probe.next(60, running).json()["event"] == "delta"
        probe.publish(jobs, {"id": "run-2", "messages": story})
        assert probe.next(30, queued).json()["event"] == "accepted"
        agent.process.send_signal(signal.SIGTERM)
        assert probe.next(30, queued).json()["error"]["code"] == "shutting_down"
        assert probe.events_until_final(running)[-1]["finish_reason"] == "length"
        assert agent.process.wait(60) == 0
    finally:
        agent.stop()
    offline = wait_status(probe, agent.device, "offline")
    assert offline["engine"]["name"] == online["engine"]["name"]
    # Retained: a client that connects later still sees the device is offline.
    late = MqttProbe(broker)
    try:
        late.subscribe(f"edgellm/{agent.device}/status")
        message = late.next(10)
        assert message.retain and message.json()["state"] == "offline"
    finally:
        late.close()
    assert "shutting down" in agent.log()


def test_last_will_says_offline_after_kill_9(
    default_bundle: Path, broker: Broker, probe: MqttProbe, tmp_path: Path
) -> None:
    agent = start_agent(default_bundle, broker, tmp_path)
    try:
        wait_status(probe, agent.device, "online")
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(10)
        assert wait_status(probe, agent.device, "offline", timeout=30)["state"] == "offline"
    finally:
        agent.stop()


def test_tampered_bundle_is_refused(default_bundle: Path, broker: Broker, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(default_bundle, copy)
    tokenizer = copy / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"<|im_end|>"', '"<|im_END|>"', 1))
    agent = start_agent(copy, broker, tmp_path / "run")
    assert agent.process.wait(60) == 2
    log = agent.log()
    assert "does not match its manifest" in log and "tokenizer.json: sha256" in log
    assert "Traceback" not in log


def test_fleet_prompt_prints_the_streamed_answer_and_figures(
    default_bundle: Path, broker: Broker, probe: MqttProbe, tmp_path: Path
) -> None:
    agent = start_agent(default_bundle, broker, tmp_path)
    try:
        wait_status(probe, agent.device, "online")
        result = subprocess.run(
            [sys.executable, "-m", "fleet", "prompt", "What is the capital of France?",
             "--device", agent.device, "--broker", broker.address, "--max-tokens", "32"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "Paris" in result.stdout
        assert "TTFT" in result.stdout and "tokens/s" in result.stdout
        as_json = subprocess.run(
            [sys.executable, "-m", "fleet", "prompt", "Hi", "--device", agent.device,
             "--broker", broker.address, "--max-tokens", "4", "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert as_json.returncode == 0, as_json.stderr
        lines = as_json.stdout.strip().splitlines()
        assert '"event": "accepted"' in lines[0] and '"event": "done"' in lines[-1]
    finally:
        agent.stop()


def test_fleet_prompt_without_a_broker_fails_clearly(tmp_path: Path) -> None:
    from agent.local_broker import free_port

    result = subprocess.run(
        [sys.executable, "-m", "fleet", "prompt", "hi", "--device", "nobody",
         "--broker", f"127.0.0.1:{free_port()}", "--timeout", "5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3
    assert "cannot reach the broker" in result.stderr

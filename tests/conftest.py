"""Shared fixtures: a real Mosquitto on a free port, the real default-model bundle (built once per
test session), and MQTT helpers that collect a job's events."""

from __future__ import annotations

import errno
import json
import os
import queue
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.bundle import MANIFEST_NAME, file_table
from agent.errors import AgentError
from agent.local_broker import LocalBroker, start_local_broker
from agent.local_broker import launch_mosquitto as launch_broker

REPO = Path(__file__).resolve().parent.parent
Broker = LocalBroker  # the tests' name for a running Mosquitto


def start_mosquitto(directory: Path, port: int | None = None) -> Broker:
    try:
        return start_local_broker(directory, port)
    except AgentError as exc:
        pytest.fail(f"{exc} (`make test` installs it)")


def launch_mosquitto(config: Path, port: int, what: str, *, append_log: bool = False) -> Broker:
    try:
        return launch_broker(config, port, what, append_log=append_log)
    except AgentError as exc:
        pytest.fail(str(exc))


@contextmanager
def mounted_tmpfs(mount_point: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of `size` (mount's syntax: "256k", "1m") at `mount_point`, for tests of a
    disk that fills up, or a read-only one (root ignores permission bits, not a read-only file
    system); skips with the reason when this machine cannot mount one (needs root and
    CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point.mkdir(parents=True, exist_ok=True)
    options = f"ro,size={size}" if read_only else f"size={size}"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here ({mounted.stderr.strip()})")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a filler file until the file system refuses another byte (unbuffered: a buffered
    file would raise ENOSPC again when closed)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while os.write(fd, b"\0" * size) == size:
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def publish_properties(
    response_topic: str | None, correlation_data: bytes | None
) -> Properties | None:
    """MQTT v5 request/response properties for a PUBLISH, or None when neither is given."""
    if response_topic is None and correlation_data is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    return props


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()


def _export_default_model(out: Path, *args: str) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "build_engine", "export", "--model", "smollm2-135m", *args,
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, f"edge-build export failed:\n{result.stderr[-4000:]}"
    return out


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M-Instruct bundle (fp32, for the cpu: ONNX Runtime's CPU graph), built
    once per session with `edge-build export`, as `make demo` does.

    EDGE_TEST_BUNDLE may point at an already-built bundle to skip the export locally."""
    preset = os.environ.get("EDGE_TEST_BUNDLE")
    if preset:
        return Path(preset)
    return _export_default_model(tmp_path_factory.mktemp("bundles") / "smollm2-135m")


@pytest.fixture(scope="session")
def orin_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model exported fp32 for --target orin: the portable graph (standard operators,
    past/present KV) that TensorRT builds and the orin bundles are quantized from.

    EDGE_TEST_ORIN_BUNDLE may point at an already-built one."""
    preset = os.environ.get("EDGE_TEST_ORIN_BUNDLE")
    if preset:
        return Path(preset)
    out = tmp_path_factory.mktemp("bundles") / "smollm2-135m-orin"
    return _export_default_model(out, "--target", "orin")


# --- an MQTT test client ----------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    correlation_data: bytes | None
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class MqttProbe:
    """A plain paho client for tests: subscribe, publish, wait for messages on a topic."""

    broker: Broker
    client: paho.Client = field(init=False)
    inbox: queue.Queue[Received] = field(default_factory=queue.Queue)
    pending: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"probe-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.connect(self.broker.host, self.broker.port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        self.inbox.put(Received(msg.topic, bytes(msg.payload), corr, bool(msg.retain)))

    def subscribe(self, topic: str) -> None:
        info = self.client.subscribe(topic, qos=1)
        assert info[0] == paho.MQTT_ERR_SUCCESS
        time.sleep(0.15)  # let the SUBACK land before anything is published

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = publish_properties(response_topic, correlation_data)
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def next(self, timeout: float = 60.0, topic: str | None = None) -> Received:
        """The oldest message not yet taken (on `topic`, if given); others wait their turn."""
        for index, message in enumerate(self.pending):
            if topic is None or message.topic == topic:
                return self.pending.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message on {topic or 'any topic'} within {timeout} s")
            try:
                message = self.inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if topic is None or message.topic == topic:
                return message
            self.pending.append(message)

    def drain(self) -> None:
        """Move everything received so far into `pending`, without waiting."""
        while not self.inbox.empty():
            self.pending.append(self.inbox.get_nowait())

    def events_until_final(self, topic: str, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Every event on `topic` up to and including `done` or `error`."""
        events: list[dict[str, Any]] = []
        while True:
            event = self.next(timeout, topic).json()
            events.append(event)
            if event["event"] in ("done", "error"):
                return events

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def probe(broker: Broker) -> Iterator[MqttProbe]:
    p = MqttProbe(broker)
    yield p
    p.close()


def unique_device() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


# --- the agent as a real process ----------------------------------------------------------------


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    device: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)


def start_agent(
    bundle: Path,
    broker: Broker,
    workdir: Path,
    *,
    device: str | None = None,
    config: str = "",
    env: dict[str, str] | None = None,
) -> AgentProcess:
    device = device or unique_device()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, "-m", "agent", "run",
        "--bundle", str(bundle), "--broker", broker.address,
        "--device-id", device, "--state-dir", str(workdir / "state"),
    ]  # fmt: skip
    if config:
        (workdir / "agent.toml").write_text(config)
        args += ["--config", str(workdir / "agent.toml")]
    log_path = workdir / "agent.log"
    process = subprocess.Popen(
        args,
        stdout=log_path.open("ab"),  # appended: a restarted agent keeps one log
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    return AgentProcess(process, device, log_path)


def wait_status(probe: MqttProbe, device: str, state: str, timeout: float = 60) -> dict[str, Any]:
    topic = f"edgellm/{device}/status"
    probe.subscribe(topic)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = probe.next(deadline - time.monotonic(), topic)
        data = status.json()
        if data["state"] == state:
            return dict(data)
    raise AssertionError(f"status of {device} never became {state}")


# --- bundles ---------------------------------------------------------------------------------


def make_synthetic_bundle(
    root: Path, *, version: str = "1", files: dict[str, bytes] | None = None
) -> Path:
    """A small, structurally valid bundle (the model bytes are not a real graph)."""
    root.mkdir(parents=True)
    contents = files or {
        "model.onnx": b"graph" * 1000,
        "tokenizer.json": b"{}",
        "golden.json": b'{"canaries": []}',
    }
    for name, data in contents.items():
        (root / name).write_bytes(data)
    manifest = {
        "format": 1,
        "name": "tiny",
        "version": version,
        "created": "2026-01-02T03:04:05Z",
        "source": {"model": "x"},
        "arch": {
            "model_type": "llama",
            "layers": 2,
            "kv_heads": 2,
            "head_dim": 8,
            "hidden": 16,
            "vocab": 10,
            "max_seq_len": 64,
        },
        "backend": "onnxruntime",
        "precision": "fp32",
        "target": None,
        "files": file_table(root),
        "quality": {},
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return root

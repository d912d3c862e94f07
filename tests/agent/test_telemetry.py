"""Telemetry: tegrastats parsing on real captures, a replayed tegrastats stream through the
configured command, /proc on this machine, job energy and speed, and the exact payload shape."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import time
import types
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import MqttConfig
from agent.mqtt_link import MqttLink, Subscription
from agent.telemetry.collector import TelemetryCollector, TelemetryPublisher
from agent.telemetry.config import TelemetryConfig, validate_telemetry
from agent.telemetry.energy import PowerSeries, integrate_mw
from agent.telemetry.nvml import NvmlSource
from agent.telemetry.perf import PerfWindow, percentile
from agent.telemetry.procfs import ProcfsSource
from agent.telemetry.tegrastats import TegrastatsReader, parse_line
from agent.topics import Topics
from tests.conftest import MqttProbe

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(
    os.environ.get("EDGE_TEGRASTATS_FIXTURES", REPO.parent / "shared" / "fixtures" / "tegrastats")
)
FIXTURE_FILES = sorted(FIXTURES.glob("*.txt"))
FIXTURE_LINES = [
    pytest.param(line, id=f"{path.stem}:{n}")
    for path in FIXTURE_FILES
    for n, line in enumerate(path.read_text().splitlines(), 1)
    if line.strip()
]
needs_fixtures = pytest.mark.skipif(
    not FIXTURE_FILES, reason=f"no tegrastats captures in {FIXTURES} (shared/fixtures missing)"
)

PAYLOAD_KEYS = {"ts", "device", "engine", "jobs", "perf", "system"}
SYSTEM_KEYS = {"cpu_pct", "ram_used_mb", "ram_total_mb", "gpu_pct", "temps_c", "power_mw"}


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def replay_command(path: Path, period_s: float, loops: int = 1000) -> str:
    """A stand-in for `tegrastats --interval N`: the capture's lines again and again."""
    script = (
        "import sys, time\n"
        f"lines = open({str(path)!r}).read().splitlines()\n"
        f"for _ in range({loops}):\n"
        "    for line in lines:\n"
        "        print(line, flush=True)\n"
        f"        time.sleep({period_s})\n"
    )
    return shlex.join([sys.executable, "-c", script])


# --- parsing real captures -----------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("line", FIXTURE_LINES)
def test_every_fixture_line_is_parsed_with_its_fields(line: str) -> None:
    sample = parse_line(line)
    assert sample is not None
    ram = re.search(r"RAM (\d+)/(\d+)MB", line)
    assert ram is not None
    assert (sample.ram_used_mb, sample.ram_total_mb) == (int(ram[1]), int(ram[2]))
    swap = re.search(r"SWAP (\d+)/(\d+)MB", line)
    assert swap is not None
    assert (sample.swap_used_mb, sample.swap_total_mb) == (int(swap[1]), int(swap[2]))

    cores = re.search(r"CPU \[([^\]]*)\]", line)
    assert cores is not None
    items = cores[1].split(",")
    assert len(sample.cpu_cores) == len(items) == 12  # AGX Orin 64GB: 12 cores
    online = [float(i.split("%")[0]) for i in items if i != "off"]
    assert [c is None for c in sample.cpu_cores] == [i == "off" for i in items]
    assert sample.cpu_pct == pytest.approx(sum(online) / len(online))

    gr3d = re.search(r"GR3D_FREQ (\d+)%", line)
    assert gr3d is not None and sample.gpu_pct == float(gr3d[1])
    emc = re.search(r"EMC_FREQ (\d+)%@(\d+)", line)
    if emc is not None:
        assert sample.engines["EMC_FREQ"].load_pct == float(emc[1])
        assert sample.engines["EMC_FREQ"].freq_mhz == int(emc[2])
    for name, state in re.findall(r"\b(NV[A-Z0-9]+|VIC|OFA|PVA0_FREQ) (off|\d+%@\d+)", line):
        engine = sample.engines[name]
        assert engine.on == (state != "off")
        if state != "off":
            assert engine.load_pct == float(state.split("%")[0])
            assert engine.freq_mhz == int(state.split("@")[1])

    temps = {name: float(v) for name, v in re.findall(r"(\w+)@(\d+(?:\.\d+)?)C\b", line)}
    assert temps and dict(sample.temps_c) == temps
    rails = {name: float(now) for name, now, _ in re.findall(r"(\w+) (\d+)mW/(\d+)mW", line)}
    assert {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"} <= set(rails)
    assert dict(sample.power_mw) == rails
    assert sample.total_power_mw == sum(rails.values())  # AGX Orin has no total-input rail

    reading = sample.to_reading().to_payload()
    assert set(reading) == SYSTEM_KEYS
    assert reading["power_mw"] == {k: round(v) for k, v in rails.items()}


@needs_fixtures
def test_r36_4_line_values() -> None:
    path = FIXTURES / "agx-orin-64gb-r36.4.4.txt"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    sample = parse_line(path.read_text().splitlines()[0])
    assert sample is not None
    assert sample.ram_used_mb == 18207 and sample.ram_total_mb == 62841
    assert sample.engines["GR3D_FREQ"].freq_mhz == 0  # "0%@[0,0]": per-GPC clocks, all idle
    assert sample.engines["NVDEC"].on is False
    assert sample.engines["APE"].freq_mhz == 174  # a clock without a load
    assert sample.temps_c["tj"] == 52.562
    assert sample.power_avg_mw["VIN_SYS_5V0"] == 4707


@needs_fixtures
@pytest.mark.parametrize("line", FIXTURE_LINES[:2])
def test_unknown_fields_are_ignored(line: str) -> None:
    known = parse_line(line)
    assert known is not None
    tokens = line.split()
    noisy = " ".join(
        ["NEW_THING 12xyz", *tokens[:4], "MTS fg 0% bg 0%", *tokens[4:], "weird@@ [x] FOO", "BAR"]
    )
    sample = parse_line(noisy)
    assert sample is not None
    assert sample.cpu_cores == known.cpu_cores
    assert (sample.ram_used_mb, sample.ram_total_mb) == (known.ram_used_mb, known.ram_total_mb)
    assert sample.temps_c == known.temps_c
    assert sample.power_mw == known.power_mw
    assert "NEW_THING" not in sample.engines and "MTS" not in sample.engines


def test_other_releases_shapes() -> None:
    """Field shapes other Jetson Linux releases print: rails without units (`POM_5V_IN 1116/1116`),
    a total-input rail, rails named like other fields (`CPU 303/303`), a switched-off sensor at
    -256C, `IRAM`, `MTS fg 0% bg 0%`."""
    nano = parse_line(
        "RAM 1550/3964MB (lfb 76x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
        "CPU [7%@102,3%@102,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 5%@76 APE 25 PLL@29C CPU@31.5C "
        "GPU@30.5C thermal@31C POM_5V_IN 1116/1116 POM_5V_GPU 40/40 POM_5V_CPU 163/163"
    )
    assert nano is not None
    assert nano.cpu_pct == 5.0 and nano.gpu_pct == 5.0
    assert nano.power_mw == {"POM_5V_IN": 1116, "POM_5V_GPU": 40, "POM_5V_CPU": 163}
    assert nano.total_power_mw == 1116  # the input rail already holds the others
    xavier = parse_line(
        "RAM 2477/31919MB (lfb 6451x4MB) SWAP 0/15959MB (cached 0MB) CPU [1%@1190,3%@1190] "
        "EMC_FREQ 0%@2133 GR3D_FREQ 0%@1377 APE 150 MTS fg 0% bg 0% AO@29C GPU@29.5C CV0@-256C "
        "GPU 0/0 CPU 303/303 SOC 909/909 CV 0/0 VDDRQ 151/151 SYS5V 1488/1488"
    )
    assert xavier is not None
    assert xavier.cpu_pct == 2.0
    assert "CV0" not in xavier.temps_c and xavier.temps_c["GPU"] == 29.5
    assert xavier.power_mw["CPU"] == 303 and xavier.total_power_mw == 2851


def test_lines_without_fields() -> None:
    assert parse_line("") is None
    assert parse_line("tegrastats: command not found") is None


# --- energy and speed ----------------------------------------------------------------------


def test_energy_is_the_trapezoid_between_samples() -> None:
    samples = [(0.0, 1000.0), (1.0, 3000.0), (2.0, 3000.0)]
    assert integrate_mw(samples, 0.0, 2.0) == pytest.approx(5.0)  # 2 J + 3 J
    assert integrate_mw(samples, 0.5, 1.5) == pytest.approx(1.25 + 1.5)  # interpolated ends
    assert integrate_mw(samples, 2.0, 3.0) == pytest.approx(3.0)  # last value held past the end
    assert integrate_mw(samples, 1.0, 1.0) == 0.0


def test_energy_is_unknown_without_nearby_samples() -> None:
    assert integrate_mw([], 0.0, 1.0) is None
    assert integrate_mw([(0.0, 1000.0)], 20.0, 21.0, max_gap_s=5.0) is None
    assert integrate_mw([(0.0, 1000.0), (30.0, 1000.0)], 1.0, 29.0, max_gap_s=5.0) is None  # stall


def test_power_series_job_energy_and_per_token() -> None:
    series = PowerSeries()
    for t in range(11):
        series.add(float(t), 2000.0)
    energy = series.job_energy(2.0, 7.0, tokens=50)
    assert energy is not None
    assert energy.joules == pytest.approx(10.0)
    assert energy.j_per_token == pytest.approx(0.2)
    assert energy.to_event() == {"joules": 10.0, "j_per_token": 0.2}
    none = series.job_energy(2.0, 7.0, tokens=0)
    assert none is not None and none.j_per_token is None
    assert PowerSeries().job_energy(0.0, 1.0, 5) is None


def test_perf_window_over_the_last_minute() -> None:
    now = [1000.0]
    perf = PerfWindow(window_s=60.0, clock=lambda: now[0])
    assert perf.figures().tokens_per_s is None and perf.figures().ttft_p50_ms is None
    perf.record(ttft_ms=100.0, tokens=50, decode_s=1.0, finished_at=930.0)  # too old
    perf.record(ttft_ms=40.0, tokens=30, decode_s=1.0, finished_at=990.0)
    perf.record(ttft_ms=60.0, tokens=10, decode_s=1.0)
    figures = perf.figures()
    assert figures.jobs == 2
    assert figures.tokens_per_s == pytest.approx(20.0)  # 40 tokens in 2 s
    assert figures.ttft_p50_ms == pytest.approx(50.0)
    assert figures.ttft_p99_ms == pytest.approx(59.8)
    now[0] = 2000.0
    assert perf.figures().jobs == 0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


# --- the replayed tegrastats stream ----------------------------------------------------------


@pytest.fixture
def collector_factory() -> Iterator[Callable[..., TelemetryCollector]]:
    made: list[TelemetryCollector] = []

    def make(command: str | None, **kwargs: Any) -> TelemetryCollector:
        collector = TelemetryCollector(TelemetryConfig(tegrastats_cmd=command), **kwargs)
        made.append(collector)
        return collector

    yield make
    for collector in made:
        collector.stop()


@needs_fixtures
def test_replayed_tegrastats_gives_energy_per_job(
    collector_factory: Callable[..., TelemetryCollector],
) -> None:
    capture = FIXTURES / "agx-orin-64gb-r36.4.4.txt"
    lines = [parse_line(line) for line in capture.read_text().splitlines()]
    totals = [s.total_power_mw for s in lines if s is not None and s.total_power_mw is not None]
    collector = collector_factory(replay_command(capture, period_s=0.05))
    collector.start(wait_s=10)
    assert collector.source == "tegrastats"
    assert wait_until(lambda: len(collector.power) >= 3)
    start = time.monotonic()
    time.sleep(0.4)  # "the job"
    end = time.monotonic()
    assert wait_until(lambda: collector.power.samples(end, end + 1)[-1][0] >= end, timeout=5)
    energy = collector.job_energy(start, end, tokens=20)
    assert energy is not None
    duration = end - start
    assert min(totals) * duration / 1000 <= energy.joules <= max(totals) * duration / 1000
    assert energy.j_per_token == pytest.approx(energy.joules / 20)

    payload = collector.snapshot({"queued": 0, "running": 1, "done": 3, "failed": 0}, None, "orin")
    assert payload["system"]["power_mw"] is not None
    assert set(payload["system"]["power_mw"]) >= {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"}
    assert payload["system"]["ram_total_mb"] == 62841


@needs_fixtures
def test_a_command_that_exits_falls_back_to_proc(
    collector_factory: Callable[..., TelemetryCollector], caplog: pytest.LogCaptureFixture
) -> None:
    capture = FIXTURE_FILES[0]
    reader = TegrastatsReader(f"cat {shlex.quote(str(capture))}", stale_after_s=0.3)
    with caplog.at_level(logging.WARNING):
        assert reader.start()
        assert reader.wait_first(10)
        assert wait_until(lambda: reader.failure is not None)
    assert reader.lines_read == len(capture.read_text().splitlines())
    assert "exited with status 0" in (reader.failure or "")
    assert wait_until(lambda: reader.latest() is None, timeout=5)
    assert sum("exited" in r.getMessage() for r in caplog.records) == 1
    reader.stop()

    collector = collector_factory(
        f"cat {shlex.quote(str(capture))}", open_nvml=lambda: None, tegrastats_stale_s=0.3
    )
    collector.start(wait_s=10)
    assert wait_until(lambda: collector.source == "procfs", timeout=5)
    payload = collector.snapshot({}, None, "d")
    assert payload["system"]["power_mw"] is None and payload["system"]["ram_total_mb"]


def test_a_missing_command_is_logged_once_and_proc_is_used(
    collector_factory: Callable[..., TelemetryCollector], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        collector = collector_factory("/nonexistent/tegrastats --interval 1000")
        collector.start(wait_s=0.1)
        assert collector.source == "procfs"
        for _ in range(3):
            collector.system()
    assert sum("cannot run" in r.getMessage() for r in caplog.records) == 1


# --- /proc, NVML, payload ----------------------------------------------------------------------


def test_proc_source_on_this_machine() -> None:
    source = ProcfsSource()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # some CPU work between the two reads
        sum(range(10_000))
    reading = source.read()
    assert reading.source == "procfs"
    assert reading.cpu_pct is not None and 0.0 <= reading.cpu_pct <= 100.0
    assert reading.ram_total_mb is not None and reading.ram_total_mb > 0
    assert reading.ram_used_mb is not None and 0 < reading.ram_used_mb < reading.ram_total_mb
    assert reading.gpu_pct is None and not reading.power_mw


def test_proc_source_figures(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    (proc / "meminfo").write_text(
        "MemTotal:       4096000 kB\nMemFree:         100000 kB\nMemAvailable:   1024000 kB\n"
    )
    thermal = tmp_path / "thermal"
    for n, (kind, milli) in enumerate([("cpu-thermal", "45500"), ("gpu-thermal", "41000")]):
        zone = thermal / f"thermal_zone{n}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    (thermal / "thermal_zone9").mkdir()  # a zone without readings is skipped
    source = ProcfsSource(proc, thermal)
    (proc / "stat").write_text("cpu  250 0 150 1000 0 0 0 0 0 0\n")  # +200 busy, +200 idle
    reading = source.read()
    assert reading.cpu_pct == pytest.approx(50.0)
    assert reading.ram_total_mb == 4000 and reading.ram_used_mb == 3000
    assert reading.temps_c == {"cpu-thermal": 45.5, "gpu-thermal": 41.0}
    assert source.read().cpu_pct is None  # no tick since the last read: unknown, not 0


def test_nvml_is_cleanly_absent_here() -> None:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert NvmlSource.open() is None
    else:
        pytest.skip("nvidia-ml-py is installed here; absence cannot be checked")


def test_nvml_figures_are_merged_with_proc(
    monkeypatch: pytest.MonkeyPatch, collector_factory: Callable[..., TelemetryCollector]
) -> None:
    """A stand-in pynvml module, because no NVIDIA GPU exists on this machine."""
    fake = types.ModuleType("pynvml")
    fake.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 1  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA RTX A2000"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=37)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2**30, total=6 * 2**30)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetTemperature = lambda h, kind: 55  # type: ignore[attr-defined]

    def not_supported(handle: object) -> int:
        raise RuntimeError("NVMLError_NotSupported")

    fake.nvmlDeviceGetPowerUsage = not_supported  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    source = NvmlSource.open()
    assert source is not None
    [gpu] = source.read()
    assert (gpu.name, gpu.util_pct, gpu.mem_used_mb, gpu.temp_c, gpu.power_mw) == (
        "NVIDIA RTX A2000",
        37.0,
        1024.0,
        55.0,
        None,
    )
    collector = collector_factory(None)
    collector.start()
    assert collector.source == "nvml"
    system = collector.system()
    assert system.gpu_pct == 37.0 and system.temps_c["gpu0"] == 55.0
    assert system.ram_total_mb is not None


def test_payload_has_exactly_the_design_keys(
    collector_factory: Callable[..., TelemetryCollector],
) -> None:
    collector = collector_factory(None, open_nvml=lambda: None)
    collector.start()
    collector.record_job(ttft_ms=52.0, tokens=40, decode_s=1.0)
    engine = {"name": "smollm2", "version": "1", "precision": "fp32", "backend": "onnxruntime"}
    payload = collector.snapshot(
        {"queued": 2, "running": 1, "done": 7, "failed": 1}, engine, "dev-1"
    )
    assert set(payload) == PAYLOAD_KEYS
    assert payload["device"] == "dev-1" and payload["engine"] == engine
    assert payload["jobs"] == {"queued": 2, "running": 1, "done": 7, "failed": 1}
    assert payload["perf"] == {"tokens_per_s": 40.0, "ttft_ms": {"p50": 52.0, "p99": 52.0}}
    assert set(payload["system"]) == SYSTEM_KEYS
    assert payload["system"]["gpu_pct"] is None and payload["system"]["power_mw"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", payload["ts"])
    assert json.loads(json.dumps(payload)) == payload
    assert collector.last_payload == payload


def test_publisher_publishes_every_interval_and_survives_failures() -> None:
    published: list[dict[str, Any]] = []
    calls = [0]

    def build() -> dict[str, Any]:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("one bad round")
        return {"n": calls[0]}

    publisher = TelemetryPublisher(0.02, build, published.append)
    publisher.start()
    assert wait_until(lambda: len(published) >= 3)
    publisher.stop()
    count = len(published)
    time.sleep(0.1)
    assert len(published) == count  # stopped
    assert published[0] == {"n": 1} and {"n": 2} not in published


@needs_fixtures
def test_telemetry_over_mqtt_from_a_replayed_tegrastats(
    probe: MqttProbe, collector_factory: Callable[..., TelemetryCollector]
) -> None:
    """The wiring the service uses: a TelemetryPublisher feeding MqttLink.publish at QoS 0."""
    topics = Topics("edgellm", "orin-replay")
    probe.subscribe(topics.telemetry)
    collector = collector_factory(replay_command(FIXTURE_FILES[-1], period_s=0.05))
    collector.start(wait_s=10)
    link = MqttLink(
        MqttConfig(host=probe.broker.host, port=probe.broker.port),
        client_id="telemetry-test",
        subscriptions=[Subscription(topics.cancel)],  # MqttLink needs at least one
        on_message=lambda message: None,
    )
    link.start()
    assert link.wait_connected(10)
    publisher = TelemetryPublisher(
        0.1,
        lambda: collector.snapshot(
            {"queued": 0, "running": 0, "done": 0, "failed": 0}, None, "orin-replay"
        ),
        lambda payload: link.publish(topics.telemetry, payload, qos=0),
    )
    publisher.start()
    try:
        message = probe.next(timeout=10, topic=topics.telemetry).json()
    finally:
        publisher.stop()
        link.stop()
    assert set(message) == PAYLOAD_KEYS and message["device"] == "orin-replay"
    assert message["system"]["ram_total_mb"] == 62841
    assert "VDD_GPU_SOC" in message["system"]["power_mw"]


def test_config_defaults_and_validation() -> None:
    config = TelemetryConfig()
    assert config.interval_s == 10.0 and config.metrics_port == 0
    expected = (
        "/usr/bin/tegrastats --interval 1000" if Path("/usr/bin/tegrastats").exists() else None
    )
    assert config.tegrastats_cmd == expected
    assert validate_telemetry(config) is config
    with pytest.raises(Exception, match="interval_s"):
        validate_telemetry(TelemetryConfig(interval_s=0.0))
    with pytest.raises(Exception, match="metrics_port"):
        validate_telemetry(TelemetryConfig(metrics_port=70000))


def test_metrics_endpoint(collector_factory: Callable[..., TelemetryCollector]) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client is not installed")
    from agent.telemetry.metrics import start_metrics_server

    collector = collector_factory(None, open_nvml=lambda: None)
    collector.start()
    collector.record_job(ttft_ms=80.0, tokens=10, decode_s=0.5)
    collector.snapshot({"queued": 1, "running": 0, "done": 4, "failed": 0}, None, "dev-2")
    server = start_metrics_server(0, collector)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    finally:
        server.close()
    assert 'edge_agent_jobs{state="done"} 4.0' in text
    assert "edge_agent_decode_tokens_per_second 20.0" in text
    assert 'edge_agent_ttft_seconds{quantile="0.5"} 0.08' in text
    assert "edge_agent_ram_total_bytes" in text
    assert 'edge_agent_info{device="dev-2"' in text

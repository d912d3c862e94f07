"""`edge-agent bench` never leaves its worker processes behind: not when it is sent SIGTERM or
SIGINT, and not when one of its workers dies under it (it used to wait for that worker forever)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def start_bench(bundle: Path, log: Path, runs: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        # -X faulthandler: if it ever hangs, the test's SIGABRT makes it print every thread's
        # stack into the log, which the failure then shows.
        [sys.executable, "-X", "faulthandler", "-m", "agent", "bench",
         "--bundle", str(bundle), "--bundle", str(bundle), "--runs", str(runs),
         "--prompt-tokens", "16", "--new-tokens", "8"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )  # fmt: skip


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def is_worker(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"multiprocessing.spawn" in command and b"resource_tracker" not in command


def alive(pid: int) -> bool:
    """Running or sleeping; an exited process left as a zombie (nobody reaps orphans in some
    containers) is not alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for_loaded_workers(bench: subprocess.Popen[bytes], log: Path) -> list[int]:
    """The two workers' pids once both have loaded their bundle (the bench runs them after)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert bench.poll() is None, log.read_text()
        workers = [pid for pid in children(bench.pid) if is_worker(pid)]
        if len(workers) == 2 and log.read_text().count("ready in") == 2:
            return workers
        time.sleep(0.2)
    raise AssertionError(f"the bench never had two loaded workers:\n{log.read_text()}")


def still_running(pids: list[int], within_s: float = 60) -> list[int]:
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]


def clean_up(bench: subprocess.Popen[bytes], workers: list[int]) -> None:
    """Whatever the test's outcome, nothing it started outlives it."""
    if bench.poll() is None:
        bench.kill()
        bench.wait(30)
    for pid in workers:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ending_the_bench_ends_its_workers(
    default_bundle: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    log = tmp_path / "bench.log"
    bench = start_bench(default_bundle, log, runs=500)
    workers: list[int] = []
    try:
        workers = wait_for_loaded_workers(bench, log)
        bench.send_signal(signum)
        try:
            code = bench.wait(60)
        except subprocess.TimeoutExpired:
            code = None
            bench.send_signal(signal.SIGABRT)
            bench.wait(30)
        assert code is not None, f"the bench did not exit after {signum.name}:\n{log.read_text()}"
        assert code != 0
        assert "Traceback" not in log.read_text()
        assert still_running(workers) == [], "workers still running after the bench ended"
    finally:
        clean_up(bench, workers)


def test_a_dead_worker_is_reported_and_the_others_end(default_bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "bench.log"
    bench = start_bench(default_bundle, log, runs=20)
    workers: list[int] = []
    try:
        workers = wait_for_loaded_workers(bench, log)
        os.kill(workers[0], signal.SIGKILL)
        try:
            code = bench.wait(120)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 1, f"the bench did not finish with an error row:\n{log.read_text()}"
        assert "its worker process ended (signal 9)" in log.read_text()
        assert still_running(workers) == [], "workers still running after the bench ended"
    finally:
        clean_up(bench, workers)

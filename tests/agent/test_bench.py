import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_bench_reports_medians_per_bundle(default_bundle: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "bench", "--bundle", str(default_bundle),
         "--runs", "2", "--new-tokens", "8", "--prompt-tokens", "40", "--json",
         "--concurrency", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["runs"] == 2
    (figures,) = report["results"]
    assert figures["prompt_tokens"] == 40 and figures["new_tokens"] == 8
    assert len(figures["decode_tokens_per_s_all"]) == 2
    assert figures["decode_tokens_per_s"] > 0 and figures["ttft_ms"] > 0
    assert figures["peak_rss_mb"] > 100 and figures["precision"] == "fp32"
    assert figures["concurrency"] == 2
    assert figures["aggregate_tokens_per_s"] > 0 and figures["single_tokens_per_s"] > 0
    # Progress goes to stderr (stdout stays the JSON): the load, each run, the N-jobs figures.
    progress = [line for line in result.stderr.splitlines() if str(default_bundle) in line]
    assert progress[0].startswith(f"load {default_bundle}: ready in ")
    assert [line.split(":")[0] for line in progress[1:3]] == [
        f"run {r}/2 {default_bundle}" for r in (1, 2)
    ]
    assert "tok/s" in progress[1] and "2 jobs at once vs one" in progress[3]


def test_bench_table_and_a_broken_bundle(default_bundle: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "bench", "--bundle", str(default_bundle),
         "--bundle", str(tmp_path), "--runs", "1", "--new-tokens", "4", "--prompt-tokens", "16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1  # one bundle failed: the others are still measured
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["runtime", "/", "bundle", "precision", "size"]
    assert "fp32" in lines[2] and "no manifest.json" in lines[3]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "bench", *args], capture_output=True, text=True, timeout=600
    )


def test_bench_over_mqtt_measures_the_same_job_both_ways(default_bundle: Path) -> None:
    """A private Mosquitto, the agent service on the loaded bundle, the job over MQTT against
    the same job called directly (the bench refuses to report if they did different work)."""
    result = bench("--bundle", str(default_bundle), "--runs", "2", "--new-tokens", "6",
                   "--prompt-tokens", "24", "--mqtt", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (figures,) = json.loads(result.stdout)["results"]
    assert 1 <= figures["mqtt_tokens"] <= 6
    assert len(figures["mqtt_overhead_ms_all"]) == 2 * 4  # PROBE_RUNS_PER_RUN per run
    assert figures["mqtt_ms"] > 0 and figures["direct_ms"] > 0


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (an optional peer of the benchmark, not a "
    "dependency: pip install llama-cpp-python)",
)
def test_bench_runs_llama_cpp_on_the_same_tokens(default_bundle: Path) -> None:
    result = bench("--bundle", str(default_bundle), "--runs", "1", "--new-tokens", "8",
                   "--prompt-tokens", "24", "--peer", "llama.cpp=smollm2-135m",
                   "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    ours, peer = json.loads(result.stdout)["results"]
    assert peer["name"].startswith("llama.cpp") and peer["precision"] == "Q4_1"
    assert peer["prompt_tokens"] == ours["prompt_tokens"] == 24
    assert peer["decode_tokens_per_s"] > 0 and peer["ttft_ms"] > 0


def test_bench_peer_problems_are_rows_or_clear_errors(default_bundle: Path, tmp_path: Path) -> None:
    peer = f"onnxruntime-genai={tmp_path / 'none'}"
    missing = bench("--bundle", str(default_bundle), "--runs", "1", "--new-tokens", "2",
                    "--prompt-tokens", "8", "--peer", peer)  # fmt: skip
    assert missing.returncode == 1  # the bundle is measured, the peer row says why it is not
    row = missing.stdout.splitlines()[-1]
    assert "error" in row and ("does not exist" in row or "is not installed" in row), row
    bad = bench("--bundle", str(default_bundle), "--peer", "vllm=model")
    assert bad.returncode == 2 and "--peer" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_the_textbook_loop_over_the_portable_graph(
    default_bundle: Path, orin_reference: Path
) -> None:
    both = bench("--bundle", str(default_bundle), "--runs", "1", "--new-tokens", "4",
                 "--prompt-tokens", "16", "--json",
                 "--peer", f"onnxruntime-loop={orin_reference}",
                 "--peer", f"onnxruntime-loop={default_bundle}")  # fmt: skip
    assert both.returncode == 1  # one peer row is an error
    ours, loop, refused = json.loads(both.stdout)["results"]
    assert loop["prompt_tokens"] == ours["prompt_tokens"] == 16
    assert loop["decode_tokens_per_s"] > 0 and loop["precision"] == "fp32"
    # The cpu bundle's graph has no attention mask: the loop says which bundle it needs.
    assert "--target orin" in refused["error"], refused


def test_a_failure_after_the_runs_is_an_error_row_that_keeps_the_figures(
    default_bundle: Path,
) -> None:
    unreachable = bench("--bundle", str(default_bundle), "--runs", "1", "--new-tokens", "4",
                        "--prompt-tokens", "16", "--json", "--mqtt",
                        "--broker", "127.0.0.1:1")  # fmt: skip
    assert unreachable.returncode == 1
    (row,) = json.loads(unreachable.stdout)["results"]
    assert row["error"].startswith("after the runs") and "127.0.0.1:1" in row["error"], row
    assert row["decode_tokens_per_s"] > 0 and row["runs"] == 1

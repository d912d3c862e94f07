import json
import subprocess
import sys
from pathlib import Path


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


def test_bench_table_and_a_broken_bundle(default_bundle: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "bench", "--bundle", str(default_bundle),
         "--bundle", str(tmp_path), "--runs", "1", "--new-tokens", "4", "--prompt-tokens", "16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1  # one bundle failed: the others are still measured
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["bundle", "precision", "size"]
    assert "fp32" in lines[2] and "no manifest.json" in lines[3]

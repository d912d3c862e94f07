"""One bundle's figures through the agent's own runtime: load, warm-up, then medians of TTFT and
decode tokens/s; optionally N jobs decoded together, and the agent's MQTT overhead."""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.bench.workload import BenchSettings, bench_prompt_ids


@dataclass(frozen=True)
class BenchResult:
    bundle: str
    name: str
    precision: str
    size_mb: float
    prompt_tokens: int
    new_tokens: int
    runs: int
    ttft_ms: float  # median
    decode_tokens_per_s: float  # median
    ttft_ms_all: list[float]
    decode_tokens_per_s_all: list[float]
    peak_rss_mb: float
    load_s: float
    concurrency: int = 0
    aggregate_tokens_per_s: float | None = None  # N concurrent jobs, median
    single_tokens_per_s: float | None = None  # the same measurement with one job, median


def bench_bundle(bundle_dir: str, settings: BenchSettings) -> dict[str, Any]:
    from agent.config import RuntimeConfig
    from agent.generation import GenerationRequest, generate
    from agent.runtime import load_model

    started = time.perf_counter()
    model = load_model(Path(bundle_dir), RuntimeConfig(threads=settings.threads))
    load_s = time.perf_counter() - started
    ids = bench_prompt_ids(model.codec, settings.prompt_tokens)
    request = GenerationRequest(ids, max_tokens=settings.new_tokens, ignore_eos=True)
    generate(model.backend, model.codec, request)  # warm-up: first-run allocations, caches
    ttfts, rates = [], []
    for _ in range(settings.runs):
        result = generate(model.backend, model.codec, request)
        ttfts.append(result.ttft_s * 1000)
        rates.append(result.decode_tokens_per_s)
    aggregate = single = None
    if settings.concurrency > 1:
        single = _aggregate_rate(model, request, 1, settings.runs)
        aggregate = _aggregate_rate(model, request, settings.concurrency, settings.runs)
    manifest = model.bundle.manifest
    size = sum(int(entry["size"]) for entry in manifest.files.values())
    figures = asdict(
        BenchResult(
            bundle=bundle_dir,
            name=f"{manifest.name} {manifest.version}",
            precision=manifest.precision,
            size_mb=round(size / 1e6, 1),
            prompt_tokens=len(ids),
            new_tokens=settings.new_tokens,
            runs=settings.runs,
            ttft_ms=round(statistics.median(ttfts), 1),
            decode_tokens_per_s=round(statistics.median(rates), 1),
            ttft_ms_all=[round(t, 1) for t in ttfts],
            decode_tokens_per_s_all=[round(r, 1) for r in rates],
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            load_s=round(load_s, 2),
            concurrency=settings.concurrency,
            aggregate_tokens_per_s=aggregate,
            single_tokens_per_s=single,
        )
    )
    if settings.mqtt:
        from agent.bench.mqtt_overhead import measure_mqtt_overhead

        figures.update(measure_mqtt_overhead(model, ids, settings))
    return figures


def _aggregate_rate(model: Any, request: Any, jobs: int, runs: int) -> float:
    """Generated tokens per second of wall time, `jobs` jobs submitted at once (median)."""
    from agent.batching import BatchGenerator
    from agent.generation import SequenceRun

    rates = []
    for _ in range(runs):
        batch = BatchGenerator(model.backend, max_batch=jobs)
        runs_ = [
            SequenceRun(request, model.codec, model.backend.info.max_seq_len) for _ in range(jobs)
        ]
        for run in runs_:
            batch.submit(run, lambda *_: None)
        started = time.perf_counter()
        while not batch.idle:
            batch.step()
        elapsed = time.perf_counter() - started
        rates.append(sum(len(run.tokens) for run in runs_) / elapsed)
    return round(statistics.median(rates), 1)

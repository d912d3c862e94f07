"""One bundle through the agent's own runtime: load and warm up, then one run of the workload at a
time (the bench interleaves them with the other contestants'); afterwards, optionally, N jobs
decoded together against one, and the agent's MQTT overhead."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from agent.bench.workload import BenchSettings, Contestant, bench_prompt_ids


def prepare_bundle(bundle_dir: str, settings: BenchSettings) -> Contestant:
    """Load the bundle and warm it up; its runs go through the agent's own `generate`."""
    from agent.config import RuntimeConfig
    from agent.generation import GenerationRequest, generate
    from agent.runtime import load_model

    started = time.perf_counter()
    model = load_model(Path(bundle_dir), RuntimeConfig(threads=settings.threads))
    load_s = time.perf_counter() - started
    ids = bench_prompt_ids(model.codec, settings.prompt_tokens)
    request = GenerationRequest(ids, max_tokens=settings.new_tokens, ignore_eos=True)
    generate(model.backend, model.codec, request)  # warm-up: first-run allocations, caches

    def run_once() -> tuple[float, float]:
        result = generate(model.backend, model.codec, request)
        return result.ttft_s * 1000, result.decode_tokens_per_s

    def extras() -> dict[str, Any]:
        figures: dict[str, Any] = {"concurrency": settings.concurrency}
        if settings.concurrency > 1:
            single, aggregate = _aggregate_rates(model, request, settings)
            figures.update(aggregate_tokens_per_s=aggregate, single_tokens_per_s=single)
        if settings.mqtt:
            from agent.bench.mqtt_overhead import measure_mqtt_overhead

            figures.update(measure_mqtt_overhead(model, ids, settings))
        return figures

    manifest = model.bundle.manifest
    info = {
        "bundle": bundle_dir,
        "name": f"{manifest.name} {manifest.version}",
        "precision": manifest.precision,
        "size_mb": round(sum(int(e["size"]) for e in manifest.files.values()) / 1e6, 1),
        "prompt_tokens": len(ids),
        "new_tokens": settings.new_tokens,
        "load_s": round(load_s, 2),
    }
    return Contestant(info, run_once, extras)


def _aggregate_rates(model: Any, request: Any, settings: BenchSettings) -> tuple[float, float]:
    """Generated tokens per second of wall time with one job, and with N jobs submitted at once
    (medians; the two alternate run by run, so drift in the machine's speed hits both)."""
    singles: list[float] = []
    batches: list[float] = []
    for _ in range(settings.runs):
        singles.append(_aggregate_rate(model, request, 1))
        batches.append(_aggregate_rate(model, request, settings.concurrency))
    return round(statistics.median(singles), 1), round(statistics.median(batches), 1)


def _aggregate_rate(model: Any, request: Any, jobs: int) -> float:
    from agent.batching import BatchGenerator
    from agent.generation import SequenceRun

    batch: BatchGenerator[int] = BatchGenerator(model.backend, max_batch=jobs)
    runs = [SequenceRun(request, model.codec, model.backend.info.max_seq_len) for _ in range(jobs)]
    for index, run in enumerate(runs):
        batch.submit(run, index)
    started = time.perf_counter()
    while not batch.idle:
        batch.step()
    return sum(len(run.tokens) for run in runs) / (time.perf_counter() - started)

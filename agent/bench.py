"""`edge-agent bench`: speed figures of one or more bundles, measured the same way for each.

Each bundle runs in a fresh child process so its peak RSS is its own. The workload is a chat-style
prompt cut to exactly `prompt_tokens` tokens and `new_tokens` greedy tokens (end-of-sequence
ignored, so every run does the same work); one warm-up run, then medians over `runs` runs.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Varied English prose, repeated as needed and cut to the requested number of tokens.
_PROMPT_TEXT = (
    "The maintenance log for line 4 shows that the conveyor motor overheated twice last week. "
    "Technicians replaced a worn bearing, checked the belt tension and cleaned the cooling fins, "
    "but the temperature alarm returned on Friday afternoon during the second shift. "
    "Summarise what happened, list the most likely remaining causes in order of probability, "
    "and propose a short inspection plan that the night crew can follow without stopping "
    "production for more than twenty minutes. Mention which sensor readings to record, which "
    "spare parts to bring, and when to escalate to the electrical engineer on call. "
)


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 156
    new_tokens: int = 128
    runs: int = 5
    threads: int = 0
    concurrency: int = 0  # > 1: also measure N jobs decoded together (continuous batching)


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


def bench_prompt_ids(codec: Any, prompt_tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < prompt_tokens:
        ids += codec.tokenizer.encode(_PROMPT_TEXT, add_special_tokens=False).ids
    return ids[:prompt_tokens]


def _bench_one(bundle_dir: str, settings: BenchSettings) -> dict[str, Any]:
    import time

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
    return asdict(
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


def _aggregate_rate(model: Any, request: Any, jobs: int, runs: int) -> float:
    """Generated tokens per second of wall time, `jobs` jobs submitted at once (median)."""
    import time

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


def _child(bundle_dir: str, settings: BenchSettings, out: Any) -> None:
    try:
        out.put(_bench_one(bundle_dir, settings))
    except Exception as exc:  # reported to the parent, which prints it
        out.put({"bundle": bundle_dir, "error": f"{type(exc).__name__}: {exc}"})


def run_bench(bundles: list[Path], settings: BenchSettings) -> list[dict[str, Any]]:
    """Benchmark each bundle in its own process, one after another."""
    context = multiprocessing.get_context("spawn")
    results = []
    for bundle in bundles:
        queue = context.Queue()
        process = context.Process(target=_child, args=(str(bundle), settings, queue))
        process.start()
        result = queue.get()
        process.join()
        results.append(result)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    header = ("bundle", "precision", "size MB", "prompt", "TTFT ms", "decode tok/s", "peak RSS MB",
              "N jobs tok/s")  # fmt: skip
    rows = [header]
    for r in results:
        if "error" in r:
            rows.append((r["bundle"], "error", r["error"], "", "", "", "", ""))
            continue
        rows.append(
            (
                r["name"],
                r["precision"],
                f"{r['size_mb']:.0f}",
                str(r["prompt_tokens"]),
                f"{r['ttft_ms']:.0f}",
                f"{r['decode_tokens_per_s']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                _aggregate_cell(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _aggregate_cell(r: dict[str, Any]) -> str:
    if not r.get("aggregate_tokens_per_s"):
        return "-"
    gain = r["aggregate_tokens_per_s"] / r["single_tokens_per_s"]
    return f"{r['concurrency']}: {r['aggregate_tokens_per_s']:.0f} ({gain:.1f}x)"


def to_json(results: list[dict[str, Any]], settings: BenchSettings) -> str:
    return json.dumps({"settings": asdict(settings), "results": results}, indent=2)

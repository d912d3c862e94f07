"""`edge-agent bench`: speed figures of one or more bundles, and of peer runtimes on the same
workload, measured the same way for each.

Each bundle and each peer runs in a fresh child process, one after another, so its peak RSS is
its own and nothing else of ours runs beside it.
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.bench.peers import Peer, parse_peer
from agent.bench.workload import BenchSettings

__all__ = ["BenchSettings", "Peer", "format_table", "parse_peer", "run_bench", "to_json"]


def _bundle_child(bundle_dir: str, settings: BenchSettings, out: Any) -> None:
    try:
        from agent.bench.ours import bench_bundle

        out.put(bench_bundle(bundle_dir, settings))
    except Exception as exc:  # reported to the parent, which prints it
        out.put({"bundle": bundle_dir, "error": f"{type(exc).__name__}: {exc}"})


def _peer_child(peer: Peer, tokenizer_bundle: str, settings: BenchSettings, out: Any) -> None:
    try:
        from agent.bench.peers import bench_peer
        from agent.bench.workload import bench_prompt_ids
        from agent.text import TextCodec

        ids = bench_prompt_ids(TextCodec(Path(tokenizer_bundle)), settings.prompt_tokens)
        out.put(bench_peer(peer, ids, settings))
    except Exception as exc:
        out.put({"bundle": f"{peer.runtime} {peer.model}", "error": f"{type(exc).__name__}: {exc}"})


def run_bench(
    bundles: list[Path], settings: BenchSettings, peers: list[Peer] | None = None
) -> list[dict[str, Any]]:
    """Benchmark each bundle, then each peer (its prompt tokenized by the first bundle's
    tokenizer: the same ids for everyone), each in its own process."""
    context = multiprocessing.get_context("spawn")
    jobs: list[tuple[Any, tuple[Any, ...]]] = [(_bundle_child, (str(b), settings)) for b in bundles]
    jobs += [(_peer_child, (peer, str(bundles[0]), settings)) for peer in peers or []]
    results = []
    for target, args in jobs:
        queue = context.Queue()
        process = context.Process(target=target, args=(*args, queue))
        process.start()
        results.append(queue.get())
        process.join()
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    header = ("runtime / bundle", "precision", "size MB", "prompt", "TTFT ms", "decode tok/s",
              "peak RSS MB", "N jobs tok/s", "MQTT overhead ms")  # fmt: skip
    rows = [header]
    for r in results:
        if "error" in r:
            rows.append((r["bundle"], "error", r["error"], *[""] * (len(header) - 3)))
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
                _mqtt_cell(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _aggregate_cell(r: dict[str, Any]) -> str:
    if not r.get("aggregate_tokens_per_s"):
        return "-"
    gain = r["aggregate_tokens_per_s"] / r["single_tokens_per_s"]
    return f"{r['concurrency']}: {r['aggregate_tokens_per_s']:.0f} ({gain:.1f}x)"


def _mqtt_cell(r: dict[str, Any]) -> str:
    if "mqtt_overhead_ms" not in r:
        return "-"
    return f"{r['mqtt_overhead_ms']:.1f} ({r['mqtt_ms']:.0f} vs {r['direct_ms']:.0f} direct)"


def to_json(results: list[dict[str, Any]], settings: BenchSettings) -> str:
    return json.dumps({"settings": asdict(settings), "results": results}, indent=2)

"""`edge-agent bench`: speed figures of one or more bundles, and of peer runtimes on the same
workload, measured the same way for each.

Each bundle and each peer lives in its own child process (its peak RSS is its own), loaded and
warmed up one after another. The runs are then interleaved: round r runs every contestant once, in
turn, so a drift in the machine's speed over the minutes of a bench (measured on this shared
2-core machine: +-15% between sequential runs of the same bundle) hits every runtime alike instead
of deciding which one looks faster. The N-jobs and MQTT figures of each bundle come after the
rounds (each is itself a paired comparison inside one process).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import queue
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.bench.peers import Peer, PeerUnavailable, parse_peer
from agent.bench.workload import BenchSettings, Contestant

__all__ = ["BenchSettings", "Peer", "format_table", "parse_peer", "run_bench", "to_json"]

_RUN, _FINISH = "run", "finish"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_STOP_GRACE_S = 10.0  # a worker's time to unwind (stop its private broker) before SIGKILL


def _raise_system_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _end_with_parent(parent_pid: int) -> None:
    """A worker must never outlive the bench: SIGTERM on SIGTERM (unwinding, so that `finally`
    blocks stop what it started), and on Linux the same when the bench dies without a word
    (SIGKILL, a crash), via PR_SET_PDEATHSIG."""
    signal.signal(signal.SIGTERM, _raise_system_exit)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the bench died before the backstop was in place
        raise SystemExit(1)


def _contestant_child(
    spec: tuple[str, Any], settings: BenchSettings, commands: Any, out: Any, parent_pid: int
) -> None:
    """Load one contestant, then answer the parent: a run per "run", the figures at "finish"."""
    _end_with_parent(parent_pid)
    kind, what = spec
    failed = {"bundle": _label(kind, what)}
    try:
        contestant = _prepare(kind, what, settings)
    except PeerUnavailable as exc:
        out.put({**failed, "error": str(exc)})
        return
    except Exception as exc:  # reported to the parent, which prints it
        out.put({**failed, "error": _describe(exc)})
        return
    out.put({"ready": True})
    ttfts: list[float] = []
    rates: list[float] = []
    while commands.get() == _RUN:
        try:
            ttft_ms, rate = contestant.run_once()
        except Exception as exc:
            out.put({**failed, "error": _describe(exc)})
            return
        ttfts.append(ttft_ms)
        rates.append(rate)
        out.put({"ran": True, "ttft_ms": ttft_ms, "decode_tokens_per_s": rate})
    try:
        extras = contestant.extras()
    except Exception as exc:  # the row keeps its run figures and says what failed after them
        extras = {"error": f"after the runs (N jobs / MQTT): {_describe(exc)}"}
    out.put(
        {
            **contestant.info,
            "runs": len(rates),
            "ttft_ms": round(statistics.median(ttfts), 1),
            "decode_tokens_per_s": round(statistics.median(rates), 1),
            "ttft_ms_all": [round(t, 1) for t in ttfts],
            "decode_tokens_per_s_all": [round(r, 1) for r in rates],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **extras,
        }
    )


def _prepare(kind: str, what: Any, settings: BenchSettings) -> Contestant:
    if kind == "bundle":
        from agent.bench.ours import prepare_bundle

        return prepare_bundle(what, settings)
    from agent.bench.peers import prepare_peer
    from agent.bench.workload import bench_prompt_ids
    from agent.text import TextCodec

    peer, tokenizer_bundle = what
    ids = bench_prompt_ids(TextCodec(Path(tokenizer_bundle)), settings.prompt_tokens)
    return prepare_peer(peer, ids, settings)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _label(kind: str, what: Any) -> str:
    return str(what) if kind == "bundle" else f"{what[0].runtime} {what[0].model}"


@dataclass
class _Child:
    label: str
    is_bundle: bool  # bundles also get the N-jobs and MQTT figures after the runs
    process: Any
    commands: Any
    out: Any
    result: dict[str, Any] | None = None  # set once it failed or finished


def run_bench(
    bundles: list[Path],
    settings: BenchSettings,
    peers: list[Peer] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark each bundle and each peer (its prompt tokenized by the first bundle's
    tokenizer: the same ids for everyone), each in its own process, runs interleaved.
    `progress` gets a line per load, per run and per contestant's after-run figures."""
    say = progress or (lambda _line: None)
    context = multiprocessing.get_context("spawn")
    specs: list[tuple[str, Any]] = [("bundle", str(b)) for b in bundles]
    specs += [("peer", (peer, str(bundles[0]))) for peer in peers or []]
    children: list[_Child] = []
    try:
        for spec in specs:  # loaded one at a time: a load never competes with another's
            child = _Child(
                _label(*spec), spec[0] == "bundle", None, context.Queue(), context.Queue()
            )
            started = time.perf_counter()
            child.process = context.Process(
                target=_contestant_child,
                args=(spec, settings, child.commands, child.out, os.getpid()),
            )
            children.append(child)  # before start: whatever happens next, it is ended
            child.process.start()
            reply = _reply(child)
            if "ready" not in reply:
                child.result = reply
                say(f"load {child.label}: {reply.get('error', 'failed')}")
            else:
                say(f"load {child.label}: ready in {time.perf_counter() - started:.1f} s")
        for round_no in range(1, settings.runs + 1):
            for child in children:
                if child.result is None:
                    child.commands.put(_RUN)
                    reply = _reply(child)
                    if "ran" not in reply:
                        child.result = reply
                        say(f"run {round_no}/{settings.runs} {child.label}: {reply.get('error')}")
                        continue
                    say(
                        f"run {round_no}/{settings.runs} {child.label}: "
                        f"TTFT {reply['ttft_ms']:.0f} ms, {reply['decode_tokens_per_s']:.1f} tok/s"
                    )
        for child in children:
            if child.result is None:
                if child.is_bundle and (settings.concurrency > 1 or settings.mqtt):
                    say(f"{child.label}: measuring {_after_runs(settings)}")
                child.commands.put(_FINISH)
                child.result = _reply(child)
            child.process.join()
    finally:  # normal end, an error, SIGINT, SIGTERM (made an exception by the caller)
        _end_workers(children)
    return [child.result or {} for child in children]


def _reply(child: _Child) -> dict[str, Any]:
    """The worker's next message; an error row if it died instead (killed, out of memory)
    rather than waiting forever for a message that will never come."""
    while True:
        try:
            reply: dict[str, Any] = child.out.get(timeout=1.0)
            return reply
        except queue.Empty:
            if not child.process.is_alive():
                code = child.process.exitcode
                how = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
                return {"bundle": child.label, "error": f"its worker process ended ({how})"}


def _end_workers(children: list[_Child]) -> None:
    """Every worker still running gets SIGTERM, then SIGKILL after a grace period."""
    running = [c.process for c in children if c.process is not None and c.process.pid]
    for process in running:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for process in running:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    for child in children:  # nothing left to read what we queued for them
        child.commands.cancel_join_thread()
        child.out.cancel_join_thread()


def _after_runs(settings: BenchSettings) -> str:
    parts = [f"{settings.concurrency} jobs at once vs one"] if settings.concurrency > 1 else []
    parts += ["the same job over MQTT vs direct"] if settings.mqtt else []
    return ", and ".join(parts)


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

"""`edge-agent`: the on-device agent's command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from agent import __version__, sdnotify
from agent.cli_support import run_handler
from agent.config import load_config, with_overrides
from agent.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    AgentError,
    ConfigError,
)

log = logging.getLogger("edge-agent")


DESCRIPTION = """\
The on-device agent: loads a model bundle, takes jobs over MQTT, streams answers back.

  edge-agent run --bundle ./bundles/smollm2-135m            # broker on localhost:1883
  edge-agent run --config /etc/edge-agent/agent.toml        # production, under systemd

Topics (prefix `edgellm`, device id D): jobs arrive on edgellm/D/jobs and on the shared
fleet subscription edgellm/fleet/jobs; answers go to edgellm/D/results/<job id> (or the request's
MQTT v5 Response Topic); the retained status is on edgellm/D/status.
"""


def _run(args: argparse.Namespace) -> int:
    from agent.ota.boot import choose_bundle, roll_back_if_on_failed_probation
    from agent.ota.probation import ProbationGuard
    from agent.service import AgentService

    config = with_overrides(
        load_config(args.config),
        broker=args.broker,
        device_id=args.device_id,
        bundle=args.bundle,
        state_dir=args.state_dir,
    )
    config.state.check_writable()
    log.info("edge-agent %s, device %s", __version__, config.device_id)
    probation = ProbationGuard(
        config.state_dir, config.ota.probation_crashes, config.ota.probation_window_s
    )
    roll_back_if_on_failed_probation(config, probation)
    sdnotify.status("verifying and loading the bundle")
    choice = choose_bundle(config)
    model = choice.model
    if model is not None:
        manifest = model.bundle.manifest
        log.info(
            "bundle %s %s (%s, %s) from %s verified and loaded",
            manifest.name,
            manifest.version,
            manifest.precision,
            model.backend.info.device,
            model.bundle.path,
        )
    else:
        log.error("running degraded, no model: %s", choice.problem)
    watchdog = sdnotify.Watchdog()
    service = AgentService(
        config, model, problem=choice.problem, probation=probation, watchdog=watchdog
    )

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    broker = f"{config.mqtt.host}:{config.mqtt.port}"
    # READY=1 only once the bundle is loaded and the broker connected; until then systemd keeps
    # the unit "activating" (and we keep extending its start timeout) instead of restarting it.
    waiting_since = time.monotonic()
    # Short waits: SIGTERM while the broker is unreachable must stop the agent at once.
    while not stop.is_set() and not service.link.wait_connected(0.25):
        if time.monotonic() - waiting_since >= 10:
            waiting_since = time.monotonic()
            log.warning("broker %s not reachable yet; retrying in the background", broker)
            sdnotify.status(f"waiting for the broker {broker}")
            sdnotify.extend_timeout(60)
    if stop.is_set():
        pass  # stopped before ever being ready: no READY=1 on the way out
    elif model is not None:
        manifest = model.bundle.manifest
        sdnotify.ready(f"serving {manifest.name} {manifest.version} ({manifest.precision})")
    else:
        sdnotify.ready(f"degraded: {choice.problem}")
    last_purge = time.monotonic()
    while not stop.wait(1.0):
        watchdog.tick()  # pings systemd only while the worker's heartbeat is fresh
        if time.monotonic() - last_purge > 3600:
            service.purge_journal()
            last_purge = time.monotonic()
    sdnotify.stopping("finishing the running jobs")
    service.shutdown()
    if service.model is not None:
        service.model.backend.close()
    probation.on_clean_exit()
    log.info("stopped")
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from agent.bench import BenchSettings, format_table, parse_peer, run_bench, to_json

    try:
        peers = [parse_peer(spec) for spec in args.peer]
    except ValueError as exc:
        raise ConfigError("bad_config", f"--peer: {exc}") from exc
    settings = BenchSettings(
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        runs=args.runs,
        threads=args.threads,
        concurrency=args.concurrency,
        mqtt=args.mqtt or args.broker is not None,
        broker=args.broker,
    )
    # SIGTERM becomes an exception like SIGINT's KeyboardInterrupt, so that run_bench unwinds
    # and ends its worker processes instead of leaving them running.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # SIGINT too, explicitly: a bench started in the background by a non-interactive shell inherits
    # SIGINT ignored, and Python then never installs its KeyboardInterrupt handler (seen: the
    # bench ran on after SIGINT under `nohup ... &`, its stack dumped by the cleanup test).
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    try:
        results = run_bench(args.bundle, settings, peers, progress=_progress_to_stderr)
    except KeyboardInterrupt:
        print("edge-agent: bench interrupted; its workers were stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(to_json(results, settings) if args.json else format_table(results))
    return EXIT_FAILED if any("error" in r for r in results) else EXIT_OK


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _progress_to_stderr(line: str) -> None:
    """Progress of long commands goes to stderr: stdout stays the table or the JSON."""
    print(line, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    run = verbs.add_parser(
        "run",
        help="run the agent (until SIGTERM)",
        description="Run the agent until SIGTERM: it finishes the running job, answers queued "
        "ones with `shutting_down`, publishes status `offline` and exits 0.",
    )
    run.add_argument("--config", type=Path, help="TOML config file (every key has a default)")
    run.add_argument("--bundle", type=Path, help="bundle directory (overrides [bundle] path)")
    run.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker (default localhost:1883)")
    run.add_argument("--device-id", help="device id used in topics (default: the host name)")
    run.add_argument("--state-dir", type=Path, help="where the agent keeps its state")
    run.set_defaults(handler=_run)
    bench = verbs.add_parser(
        "bench",
        help="speed figures of one or more bundles",
        description="Measure TTFT, decode tokens/s and peak RSS of each bundle on this machine: "
        "each bundle in its own process, the same prompt (cut to --prompt-tokens) and "
        "--new-tokens greedy tokens, one warm-up run, then medians over --runs runs.",
    )
    bench.add_argument(
        "--bundle", type=Path, action="append", required=True, help="bundle dir (repeatable)"
    )
    bench.add_argument("--prompt-tokens", type=int, default=156)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--runs", type=int, default=5)
    bench.add_argument("--threads", type=int, default=0, help="0 = one per physical core")
    bench.add_argument(
        "--concurrency",
        type=int,
        default=0,
        metavar="N",
        help="also measure aggregate tokens/s of N jobs decoded together vs one",
    )
    bench.add_argument(
        "--mqtt",
        action="store_true",
        help="also time the same job over MQTT against a direct call (the agent's overhead), "
        "through a private Mosquitto on a free port",
    )
    bench.add_argument("--broker", metavar="HOST:PORT", help="for --mqtt: use this broker instead")
    bench.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="RUNTIME=MODEL",
        help="the same workload through another runtime, when it is installed: "
        "llama.cpp=FILE.gguf (or llama.cpp=smollm2-135m), onnxruntime-genai=DIR (a folder "
        "from its model builder), onnxruntime-loop=BUNDLE (the textbook session.run loop, "
        "the baseline, over an fp32 bundle exported with --target orin); repeatable",
    )
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # agent/errors.py: the exit codes of the three tools (every AgentError is EXIT_BAD_INPUT)
    return run_handler(args, prefix="edge-agent: error:", catch=AgentError)


if __name__ == "__main__":
    sys.exit(main())

"""`edge-fleet update` (one device) and `edge-fleet rollout` (many, in waves): send the update
command and follow every device to its final state."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.cli_support import complain
from agent.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_ANSWER, EXIT_OK
from fleet.commands.args import (
    Verbs,
    add_broker_args,
    add_json_arg,
    add_timeout_arg,
    add_verb,
    broker,
    max_failures,
    positive_int,
)
from fleet.rollout import (
    DeviceResult,
    RolloutObserver,
    WavePlan,
    format_summary,
    new_rollout_id,
    rollout,
)
from fleet.update import (
    OtaStatus,
    UpdateError,
    UpdateTimeout,
    format_status,
    make_command,
    send_update,
)


def _update(args: argparse.Namespace) -> int:
    def on_status(status: OtaStatus) -> None:
        if args.json:
            print(json.dumps(status.to_json()), flush=True)
        else:
            print(format_status(args.device, status), flush=True)

    try:
        final = send_update(
            broker(args), args.device, args.url, args.sha256, args.size, args.version,
            args.id, timeout_s=args.timeout, on_status=on_status,
            allow_downgrade=args.allow_downgrade,
        )  # fmt: skip
    except UpdateTimeout as exc:
        complain("edge-fleet:", exc)
        return EXIT_NO_ANSWER
    except UpdateError as exc:
        if exc.code == "no_broker":
            complain("edge-fleet:", exc)
            return EXIT_NO_ANSWER
        raise
    return EXIT_OK if final.state == "active" else EXIT_FAILED


def _read_devices(args: argparse.Namespace) -> list[str]:
    if args.devices is not None:
        return [d.strip() for d in args.devices.split(",") if d.strip()]
    try:
        text = args.devices_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UpdateError("bad_command", f"cannot read --devices-file: {exc}") from exc
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _progress_printer() -> RolloutObserver:
    """Each wave, each device's state changes, and timeouts, as human lines."""
    last_state: dict[str, str] = {}

    def on_wave(index: int, waves: list[list[str]]) -> None:
        kind = " (canary)" if index == 0 else ""
        wave = waves[index]
        print(f"wave {index + 1}/{len(waves)}{kind}: {len(wave)} device(s): {', '.join(wave)}")

    def on_status(device: str, status: OtaStatus) -> None:
        if last_state.get(device) != status.state:  # transitions only
            last_state[device] = status.state
            print(f"  {format_status(device, status)}", flush=True)

    def on_result(result: DeviceResult) -> None:
        if result.state == "timeout":
            print(f"  {result.device} timeout: {result.error}", flush=True)

    return RolloutObserver(on_wave=on_wave, on_status=on_status, on_result=on_result)


def _rollout(args: argparse.Namespace) -> int:
    devices = _read_devices(args)
    config = broker(args)
    try:
        plan = WavePlan(args.canary, args.growth, args.max_failures, args.timeout)
        command = make_command(
            args.id or new_rollout_id(), args.url, args.sha256, args.size, args.version,
            args.allow_downgrade,
        )  # fmt: skip
        observer = RolloutObserver() if args.json else _progress_printer()
        summary = rollout(config, devices, command, plan, observer)
    except ValueError as exc:
        complain("edge-fleet rollout: error:", exc)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print()
        print(format_summary(summary))
    return EXIT_OK if summary.ok else EXIT_FAILED


# --- the verbs --------------------------------------------------------------------------------


def _add_update_args(parser: argparse.ArgumentParser) -> None:
    """The update command's fields (from `edge-fleet pack`), then the broker flags."""
    parser.add_argument("--url", required=True, help="where devices download the archive")
    parser.add_argument("--sha256", required=True, help="the archive's sha256 (from `pack`)")
    parser.add_argument(
        "--size", required=True, type=positive_int, help="the archive's size in bytes"
    )
    parser.add_argument("--version", required=True, help="the bundle's manifest version")
    parser.add_argument("--id", help="update id (default: a random one)")
    parser.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="let devices install a version that is not newer than the highest they ever ran "
        "(a deliberate rollback; refused as `downgrade` otherwise)",
    )
    add_broker_args(parser)


def add_update_verbs(verbs: Verbs) -> None:
    update = add_verb(
        verbs, "update", _update,
        help="update one device and follow its progress",
        description="Publish the update command to P/DEVICE/ota and print each state the "
        "device reports on P/DEVICE/ota/status (downloading, verifying, testing) until it is "
        "final: active (the new bundle serves), rolled_back or failed (the old bundle still "
        "serves). Take --url, --sha256, --size and --version from `edge-fleet pack`. Exit "
        "status: 0 active, 1 failed or rolled back, 3 no final state in time (or no broker).",
    )  # fmt: skip
    update.add_argument("--device", required=True, help="device id")
    _add_update_args(update)
    add_timeout_arg(update, 1800.0, "seconds to wait for the end (1800)")
    add_json_arg(update, "print each status as a JSON line")

    rollout_verb = add_verb(
        verbs, "rollout", _rollout,
        help="update many devices in growing waves, halting on failures",
        description="Update a canary wave first (--canary devices), then waves growing by "
        "--growth (1, 2, 4, 8, ... by default), each in parallel and followed to the end. After "
        "each wave, if the failures (failed, rolled_back, timeout) exceed --max-failures, no "
        "further wave starts and the remaining devices are reported skipped. Prints each wave, "
        "state changes, and a summary table. Exit status: 0 every device active, 1 halted or "
        "any failure, 2 bad arguments.",
    )  # fmt: skip
    devices = rollout_verb.add_mutually_exclusive_group(required=True)
    devices.add_argument("--devices", help="comma-separated device ids, in rollout order")
    devices.add_argument(
        "--devices-file", type=Path, metavar="FILE",
        help="one device id per line, in rollout order (# comments allowed)",
    )  # fmt: skip
    _add_update_args(rollout_verb)
    rollout_verb.add_argument(
        "--canary", type=positive_int, default=1, help="devices in the first wave (1)"
    )
    rollout_verb.add_argument(
        "--growth", type=float, default=2.0, help="each wave is this many times the last (2)"
    )
    rollout_verb.add_argument(
        "--max-failures", type=max_failures, default=0, metavar="N|P%",
        help="failures tolerated before halting: a count, or a percentage of the devices "
        "attempted (default 0: the first failure halts)",
    )  # fmt: skip
    add_timeout_arg(rollout_verb, 1800.0, "seconds per device (1800)")
    add_json_arg(rollout_verb, "print only the summary, as JSON")

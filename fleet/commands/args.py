"""The argument shapes several `edge-fleet` verbs share, each defined once, and the argument
types (`HOST:PORT`, `500k`, positive integers) argparse checks before a handler runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import MqttConfig, validate_tls
from agent.errors import ConfigError
from fleet.rollout import MaxFailures, parse_max_failures

Handler = Callable[[argparse.Namespace], int]
Verbs = Any  # argparse's subparsers action (its class is private)


def add_verb(
    verbs: Verbs, name: str, handler: Handler, *, help: str, description: str, **options: Any
) -> argparse.ArgumentParser:
    """A verb whose `handler(args)` runs when it is chosen (`fleet.cli.main`)."""
    parser: argparse.ArgumentParser = verbs.add_parser(
        name, help=help, description=description, **options
    )
    parser.set_defaults(handler=handler)
    return parser


# --- types ------------------------------------------------------------------------------------


def parse_broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def parse_rate(value: str) -> float:
    """`500k`, `2M`, `1048576`: bytes per second (k = 1000, M = 10^6)."""
    units = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}
    text = value.strip().removesuffix("/s").removesuffix("B")
    try:
        rate = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"expected bytes per second like 500k or 2M, got {value!r}"
        ) from None
    if rate <= 0:
        raise argparse.ArgumentTypeError("the rate must be positive")
    return rate


def max_failures(value: str) -> MaxFailures:
    try:
        return parse_max_failures(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- shared arguments -------------------------------------------------------------------------


def add_broker_args(parser: argparse.ArgumentParser) -> None:
    """--broker, --prefix and the TLS group; `broker(args)` turns them into an MqttConfig."""
    parser.add_argument(
        "--broker", type=parse_broker, default=("localhost", 1883), metavar="HOST:PORT",
        help="the MQTT broker the devices use (default localhost:1883)",
    )  # fmt: skip
    parser.add_argument("--prefix", default="edgellm", help="topic prefix (default edgellm)")
    tls = parser.add_argument_group(
        "TLS", "for a broker set up from deploy/mosquitto (port 8883, client certificates)"
    )
    tls.add_argument("--ca", metavar="PEM", help="trust the broker by this CA (turns TLS on)")
    tls.add_argument("--cert", metavar="PEM", help="the operator's certificate (`certs client`)")
    tls.add_argument("--key", metavar="PEM", help="the operator's private key")


def broker(args: argparse.Namespace) -> MqttConfig:
    """The operator's MQTT settings from the shared flags (`add_broker_args`)."""
    host, port = args.broker
    config = MqttConfig(
        host=host,
        port=port,
        prefix=args.prefix,
        session_expiry_s=0,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
    )
    try:
        validate_tls(config, names={"ca_file": "--ca", "cert_file": "--cert", "key_file": "--key"})
    except ConfigError as exc:
        raise ConfigError("bad_command", exc.message) from None
    return config


def add_bundle_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory")


def add_trusted_arg(parser: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    parser.add_argument(
        "--trusted", type=Path, nargs="+", required=required, metavar="DIR_OR_PUB", help=help
    )


def add_path_arg(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A required directory or file flag (`--out DIR`, `--ca DIR`)."""
    parser.add_argument(flag, type=Path, required=True, help=help)


def add_repeatable_arg(parser: argparse.ArgumentParser, flag: str, metavar: str, help: str) -> None:
    parser.add_argument(flag, action="append", default=[], metavar=metavar, help=help)


def add_timeout_arg(parser: argparse.ArgumentParser, default: float, help: str) -> None:
    parser.add_argument("--timeout", type=float, default=default, help=help)


def add_json_arg(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--json", action="store_true", help=help)


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"

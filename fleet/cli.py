"""`edge-fleet`: the operator's command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.config import MqttConfig
from fleet import __version__
from fleet.prompt import NoAnswer, PromptJob, print_event, send_prompt

DESCRIPTION = """\
Operate a fleet of edge agents over MQTT.

  edge-fleet prompt "What is the capital of France?" --device orin-01
  edge-fleet prompt "Summarise ..." --broker mqtt.site:1883 --max-tokens 200 --json
  edge-fleet prompt "Hello" --fleet            # any one device (shared subscription)
"""


def _parse_broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _prompt(args: argparse.Namespace) -> int:
    host, port = args.broker
    broker = MqttConfig(host=host, port=port, prefix=args.prefix, session_expiry_s=0)
    job = PromptJob(
        text=args.text,
        device=None if args.fleet else args.device,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        raw=args.raw,
        system=args.system,
        job_id=args.id,
    )

    def on_event(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event, ensure_ascii=False), flush=True)
        else:
            print_event(event)

    try:
        final = send_prompt(broker, job, timeout_s=args.timeout, on_event=on_event)
    except NoAnswer as exc:
        print(f"edge-fleet: error: {exc}", file=sys.stderr)
        return 3
    return 0 if final.get("event") == "done" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-fleet",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-fleet {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    prompt = verbs.add_parser(
        "prompt",
        help="send one prompt and print the streamed answer",
        description="Send one job and print the answer as it streams, then its figures (TTFT, "
        "tokens/s). Exit status: 0 answered, 1 refused by the device, 3 no answer in time.",
    )
    prompt.add_argument("text", help="the user message (or the raw prompt with --raw)")
    target = prompt.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="device id")
    target.add_argument("--fleet", action="store_true", help="any one device of the fleet")
    prompt.add_argument(
        "--broker", type=_parse_broker, default=("localhost", 1883), metavar="HOST:PORT"
    )
    prompt.add_argument("--prefix", default="edgellm", help="topic prefix (default edgellm)")
    prompt.add_argument("--max-tokens", type=int, default=256)
    prompt.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    prompt.add_argument("--system", help="a system message to send first")
    prompt.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    prompt.add_argument("--id", help="job id (default: a random one)")
    prompt.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (300)")
    prompt.add_argument("--json", action="store_true", help="print each event as a JSON line")
    prompt.set_defaults(handler=_prompt)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""`edge-fleet prompt`: one job, its answer streamed."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.cli_support import complain
from agent.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_ANSWER, EXIT_OK
from fleet.commands.args import Verbs, add_broker_args, add_json_arg, add_timeout_arg, add_verb
from fleet.commands.args import broker as broker_of
from fleet.prompt import BadJob, NoAnswer, PromptJob, print_event, send_prompt


def _prompt(args: argparse.Namespace) -> int:
    broker = broker_of(args)
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
        complain("edge-fleet: error:", exc)
        return EXIT_NO_ANSWER
    except BadJob as exc:
        complain("edge-fleet: error:", exc)
        return EXIT_BAD_INPUT
    return EXIT_OK if final.get("event") == "done" else EXIT_FAILED


def add_job_verbs(verbs: Verbs) -> None:
    prompt = add_verb(
        verbs, "prompt", _prompt,
        help="send one prompt and print the streamed answer",
        description="Send one job and print the answer as it streams, then its figures (TTFT, "
        "tokens/s). Exit status: 0 answered, 1 refused by the device, 3 no answer in time.",
    )  # fmt: skip
    prompt.add_argument("text", help="the user message (or the raw prompt with --raw)")
    target = prompt.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="device id")
    target.add_argument("--fleet", action="store_true", help="any one device of the fleet")
    add_broker_args(prompt)
    prompt.add_argument("--max-tokens", type=int, default=256)
    prompt.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    prompt.add_argument("--system", help="a system message to send first")
    prompt.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    prompt.add_argument("--id", help="job id (default: a random one)")
    add_timeout_arg(prompt, 300.0, "seconds to wait (300)")
    add_json_arg(prompt, "print each event as a JSON line")

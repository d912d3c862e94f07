"""`edge-fleet`: the operator's command line.

The verbs live in fleet/commands/ (one module per group, each defining its verbs' arguments
beside their handlers); this module assembles the parser, in the order `--help` lists the verbs,
and runs the chosen handler through the tools' shared runner (agent/cli_support.py)."""

from __future__ import annotations

import argparse
import sys

from agent.cli_support import run_handler
from agent.errors import EXIT_BAD_INPUT, EXIT_FAILED, AgentError, CodedError
from fleet import __version__
from fleet.commands.bundles import add_bundle_verbs
from fleet.commands.certs import add_certs_verb
from fleet.commands.jobs import add_job_verbs
from fleet.commands.updates import add_update_verbs

DESCRIPTION = """\
Operate a fleet of edge agents over MQTT.

  edge-fleet prompt "What is the capital of France?" --device orin-01
  edge-fleet prompt "Summarise ..." --broker mqtt.site:1883 --max-tokens 200 --json
  edge-fleet prompt "Hello" --fleet            # any one device (shared subscription)

Over-the-air bundle updates, end to end:

  edge-fleet keygen --out ~/fleet-keys          # once; install fleet.pub on every device
  edge-fleet sign bundles/qwen2.5-3b --key ~/fleet-keys/fleet.key
  edge-fleet verify bundles/qwen2.5-3b --trusted ~/fleet-keys/fleet.pub
  edge-fleet pack bundles/qwen2.5-3b --out www/qwen2.5-3b.tar
  edge-fleet serve www --host 0.0.0.0           # or any web server with Range support
  edge-fleet update --device orin-01 --url http://HOST:8000/qwen2.5-3b.tar --sha256 H --size N \\
      --version V
  edge-fleet rollout --devices-file fleet.txt --url ... --sha256 H --size N --version V \\
      --max-failures 10%

Broker TLS with one certificate per identity (see `edge-fleet certs --help`):

  edge-fleet certs ca --out ca
  edge-fleet certs server --ca ca --host mqtt.site --out broker
  edge-fleet certs device --ca ca --id orin-01 --out certs/orin-01
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-fleet",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-fleet {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_job_verbs(verbs)  # prompt
    add_bundle_verbs(verbs)  # keygen, sign, verify, pack, serve
    add_update_verbs(verbs)  # update, rollout
    add_certs_verb(verbs)
    return parser


def _exit_code(error: CodedError) -> int:
    return EXIT_BAD_INPUT if error.code == "bad_command" else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # every refusal has a code and says what to do: `edge-fleet VERB: error [code] message`
    return run_handler(
        args, prefix=f"edge-fleet {args.verb}: error", catch=AgentError, exit_code=_exit_code
    )


if __name__ == "__main__":
    sys.exit(main())

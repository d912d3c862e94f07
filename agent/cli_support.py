"""What `edge-agent`, `edge-build` and `edge-fleet` share around their verbs: run the chosen
handler, and turn an error raised on purpose into one line on stderr and an exit code.

Stdlib-only (plus agent.errors): the fleet tool imports it on an operator's laptop, where no
inference stack is installed (tests/test_layering.py), and the build step imports it too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from agent.errors import EXIT_BAD_INPUT, CodedError

Handler = Callable[[argparse.Namespace], int]


def always_bad_input(_: CodedError) -> int:
    """The exit code of `edge-agent` and `edge-build` for every coded error: 2 (bad input)."""
    return EXIT_BAD_INPUT


def complain(prefix: str, message: object) -> None:
    """One line on stderr: `PREFIX MESSAGE` (a `CodedError` prints as `[code] message`)."""
    print(f"{prefix} {message}", file=sys.stderr)


def run_handler(
    args: argparse.Namespace,
    *,
    prefix: str,
    catch: type[CodedError] | tuple[type[CodedError], ...] = CodedError,
    exit_code: Callable[[CodedError], int] = always_bad_input,
) -> int:
    """Run `args.handler(args)` (the verb argparse chose, set with `set_defaults(handler=...)`)
    and return its exit code. An error of `catch` becomes `PREFIX [code] message` on stderr and
    `exit_code(error)`; bugs (any other exception) keep their traceback. A KeyboardInterrupt
    propagates: a verb that owes its workers a clean stop catches it itself (`edge-agent bench`,
    `edge-fleet serve`)."""
    handler: Handler = args.handler
    try:
        return handler(args)
    except catch as exc:
        complain(prefix, exc)
        return exit_code(exc)

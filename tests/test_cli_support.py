"""The runner the three tools share (agent/cli_support.py): a handler's exit code passes through,
an error of the tool's root becomes one line `PREFIX [code] message` and the tool's exit code,
anything else keeps its traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from agent.cli_support import run_handler
from agent.errors import EXIT_BAD_INPUT, AgentError, CodedError, ConfigError
from build_engine.errors import BuildError


def namespace(handler: Callable[[argparse.Namespace], int]) -> argparse.Namespace:
    return argparse.Namespace(handler=handler, value=7)


def raising(error: BaseException) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        raise error

    return handler


def test_the_handler_gets_the_arguments_and_its_code_passes_through(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_handler(namespace(lambda args: args.value), prefix="tool: error:") == 7
    assert capsys.readouterr().err == ""


def test_a_coded_error_is_one_line_and_exit_2_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = namespace(raising(ConfigError("bad_config", "mqtt.port must be 1-65535")))
    assert run_handler(args, prefix="edge-agent: error:", catch=AgentError) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "edge-agent: error: [bad_config] mqtt.port must be 1-65535\n"


def test_the_exit_code_may_depend_on_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    def exit_code(error: CodedError) -> int:
        return 2 if error.code == "bad_command" else 1

    refused = namespace(raising(AgentError("untrusted", "not signed")))
    assert run_handler(refused, prefix="edge-fleet verify: error", exit_code=exit_code) == 1
    assert capsys.readouterr().err == "edge-fleet verify: error [untrusted] not signed\n"


def test_only_the_tools_own_errors_are_caught() -> None:
    # edge-build catches BuildError: an agent error there is a bug, with its traceback
    with pytest.raises(AgentError):
        run_handler(namespace(raising(AgentError("x", "y"))), prefix="p", catch=BuildError)
    with pytest.raises(ZeroDivisionError):
        run_handler(namespace(raising(ZeroDivisionError())), prefix="p")
    with pytest.raises(KeyboardInterrupt):
        run_handler(namespace(raising(KeyboardInterrupt())), prefix="p")

"""`edge-fleet`'s error lines and exit codes, through `fleet.cli.main` (the shared runner of
agent/cli_support.py), and the rollout's `WavePlan` checks. Nothing here needs a broker: every
refusal happens before a command is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.cli import build_parser, main
from fleet.rollout import WavePlan

SHA = "cd" * 32
UPDATE = ["--url", "http://files.example:8000/tiny.tar", "--sha256", SHA, "--size", "1234",
          "--version", "2"]  # fmt: skip


def test_wave_plan_defaults_are_the_cli_defaults() -> None:
    args = build_parser().parse_args(["rollout", "--devices", "a", *UPDATE])
    assert WavePlan() == WavePlan(args.canary, args.growth, args.max_failures, args.timeout)
    assert WavePlan() == WavePlan(canary=1, growth=2.0, max_failures=0, per_device_timeout_s=1800)
    waves = WavePlan(canary=2, growth=3.0).waves([f"d{i}" for i in range(9)])
    assert [len(w) for w in waves] == [2, 6, 1]


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"canary": 0}, "canary must be at least 1 device"),
        ({"growth": 0.5}, "growth must be at least 1.0"),
        ({"max_failures": -1}, "max_failures must be >= 0"),
        ({"max_failures": 1.5}, "a fractional max_failures must be in [0, 1]"),
        ({"max_failures": True}, "not a bool"),
    ],
)
def test_wave_plan_refuses_a_plan_that_cannot_run(plan: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        WavePlan(**plan)  # type: ignore[arg-type]


def test_a_bad_update_command_is_bad_command_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["rollout", "--devices", "a,b", *UPDATE[:3], "NOT-HEX", *UPDATE[4:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-fleet rollout: error [bad_command] update command: `sha256` ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_bad_wave_plan_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rollout", "--devices", "a,b", *UPDATE, "--growth", "0.5"]) == 2
    assert capsys.readouterr().err == (
        "edge-fleet rollout: error: growth must be at least 1.0 (waves never shrink), got 0.5\n"
    )


def test_a_bad_tls_flag_is_bad_command_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pem"
    assert main(["update", "--device", "d1", *UPDATE, "--ca", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-fleet update: error [bad_command] ") and "--ca" in err


def test_a_refusal_is_exit_1_with_its_code(
    bundle: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(bundle), "--trusted", str(keys[1])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edge-fleet verify: error [unsigned] ") and err.count("\n") == 1


def test_serving_a_missing_directory_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith(f"edge-fleet: error: cannot serve {tmp_path}")

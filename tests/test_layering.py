"""The import layering, checked in fresh interpreters: the config (and the contract) are leaves,
no agent or fleet import path loads torch or transformers, and the fleet tool, which runs on an
operator's laptop, loads no inference stack (onnxruntime, tokenizers, numpy) either.

Each check runs in a fresh interpreter that prints `sys.modules` at exit (after the command ran,
`--help` included), so a heavy import anywhere down the chain is seen."""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import agent
import fleet

REPO = Path(__file__).resolve().parent.parent
TRAINING = {"torch", "transformers"}  # build-side only: never on a device
INFERENCE = {"onnxruntime", "tokenizers", "numpy"}  # the device's stack: not on a laptop


# Run first in each interpreter: at exit, whatever the command did (argparse's --help exits), print
# the modules it imported.
PROBE = (
    "import atexit, json, sys\n"
    "atexit.register(\n"
    "    lambda: print('\\nMODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    ")\n"
)


def _modules_of(code: str, expect: str = "") -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE + code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, f"{code!r} failed:\n{result.stderr[-3000:]}"
    assert expect in result.stdout, f"{code!r} did not print {expect!r}: {result.stdout[-500:]}"
    line = next(x for x in result.stderr.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


_startup: set[str] = set()


def imported(code: str) -> set[str]:
    """The modules a fresh interpreter imports running `code`, beyond those of its start (site,
    the editable install's finder); the code must succeed (a command must print its usage)."""
    if not _startup:
        _startup.update(_modules_of("pass"))
    return _modules_of(code, "usage:" if "runpy" in code else "") - _startup


def run_command(name: str, *args: str) -> str:
    """Code that runs the installed entry point beside this interpreter (what a user runs) with
    `args`, else the package's `__main__`."""
    script = Path(sys.executable).parent / name
    package = {"edge-agent": "agent", "edge-fleet": "fleet"}[name]
    run = f"run_path({str(script)!r}" if script.is_file() else f"run_module({package!r}"
    return f"import runpy\nsys.argv = {[name, *args]!r}\nrunpy.{run}, run_name='__main__')"


def roots(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def all_modules(package: object) -> list[str]:
    path = package.__path__  # type: ignore[attr-defined]
    name = package.__name__  # type: ignore[attr-defined]
    return sorted(
        m.name for m in pkgutil.walk_packages(path, f"{name}.") if not m.name.endswith("__main__")
    )


def import_all(names: list[str]) -> str:
    return f"import importlib\nfor n in {names!r}:\n    importlib.import_module(n)"


def test_the_helper_sees_a_heavy_import() -> None:
    """The check itself: an import of numpy is seen (otherwise every test below passes blind)."""
    assert "numpy" in roots(imported("import agent.sampling"))


@pytest.mark.parametrize("leaf", ["agent.errors", "agent.state_dir", "agent.config"])
def test_the_config_and_the_error_root_import_only_the_stdlib(leaf: str) -> None:
    modules = imported(f"import {leaf}")
    project = {m for m in modules if m.split(".")[0] in ("agent", "fleet", "build_engine")}
    # agent.contract is itself a stdlib-only leaf (tested below); the config takes the id syntax
    # from it rather than writing it again.
    outside = {m for m in project if not m.startswith("agent.contract")}
    assert outside <= {"agent", "agent.errors", "agent.state_dir", "agent.config"}, (
        f"{leaf} imports other project modules: {sorted(outside - {leaf})}"
    )
    third_party = roots(modules) - set(sys.stdlib_module_names) - {"agent"}
    assert not third_party, f"{leaf} imports {sorted(third_party)}"


def test_the_contract_is_a_leaf() -> None:
    if importlib.util.find_spec("agent.contract") is None:
        pytest.skip("agent/contract does not exist yet")
    modules = imported("import agent.contract")
    project = {m for m in modules if m.split(".")[0] in ("agent", "fleet", "build_engine")}
    outside = {m for m in project if not m.startswith("agent.contract")}
    assert outside <= {"agent", "agent.errors"}, f"agent.contract imports {sorted(outside)}"
    third_party = roots(modules) - set(sys.stdlib_module_names) - {"agent"}
    assert not third_party, f"agent.contract imports {sorted(third_party)}"


@pytest.mark.parametrize(
    "code",
    [
        "import agent.cli",
        run_command("edge-agent", "--help"),
        run_command("edge-agent", "run", "--help"),
        run_command("edge-agent", "bench", "--help"),
    ],
    ids=[
        "import agent.cli",
        "edge-agent --help",
        "edge-agent run --help",
        "edge-agent bench --help",
    ],
)
def test_the_agent_command_line_loads_no_training_or_inference_stack(code: str) -> None:
    """`edge-agent --help` (and the import of its CLI) needs neither the model nor torch."""
    loaded = roots(imported(code))
    assert not loaded & (TRAINING | {"build_engine"}), sorted(
        loaded & (TRAINING | {"build_engine"})
    )
    assert not loaded & INFERENCE, f"the agent's CLI imports {sorted(loaded & INFERENCE)} at once"


def test_no_agent_module_imports_torch_transformers_or_the_build_step() -> None:
    """Every module of the agent, imported together: the device carries no torch/transformers,
    and the agent does not import build_engine at module import (agent/bench/peers.py uses it
    lazily, for model aliases only)."""
    loaded = roots(imported(import_all(all_modules(agent))))
    assert not loaded & TRAINING, f"an agent module imports {sorted(loaded & TRAINING)}"
    assert "build_engine" not in loaded, "an agent module imports build_engine at import time"


def test_bench_peers_does_not_import_the_build_step() -> None:
    loaded = roots(imported("import agent.bench.peers"))
    assert "build_engine" not in loaded and not loaded & TRAINING


@pytest.mark.parametrize(
    "code",
    [
        "import fleet.cli",
        run_command("edge-fleet", "--help"),
        run_command("edge-fleet", "keygen", "--help"),
        import_all(all_modules(fleet)),
    ],
    ids=["import fleet.cli", "edge-fleet --help", "edge-fleet keygen --help", "every fleet module"],
)
def test_the_fleet_tool_loads_no_inference_or_training_stack(code: str) -> None:
    """`edge-fleet` runs on an operator's laptop: no model runtime, tokenizer or numpy."""
    loaded = roots(imported(code))
    heavy = loaded & (TRAINING | INFERENCE | {"build_engine"})
    assert not heavy, f"the fleet tool imports {sorted(heavy)}"

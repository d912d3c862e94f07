"""Every build_engine.quantize module imports on its own, in a fresh interpreter.

A module-level import cycle fails as "partially initialized module" for some import order;
importing each module alone, in a new process, tries each one as the entry point. A cycle through
imports inside functions never fails at import time, so `common`, the leaf every other module
builds on, is also read: it imports no other quantize module, not even inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import build_engine.quantize

_PACKAGE = Path(build_engine.quantize.__file__).parent
MODULES = sorted(p.stem for p in _PACKAGE.glob("*.py") if p.stem != "__init__")


def test_the_package_has_the_modules_this_test_expects() -> None:
    assert {"common", "cpu", "dispatch", "fp16", "int4_weights", "int8_weights", "orin"} <= set(
        MODULES
    )


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import build_engine.quantize.{module}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=_PACKAGE.parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_common_is_the_leaf() -> None:
    # Every import statement, module level or inside a function (a lazy import is a cycle too).
    tree = ast.parse((_PACKAGE / "common.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "numpy" in imported and "build_engine.errors" in imported  # the walk sees imports
    assert not {m for m in imported if m.startswith("build_engine.quantize")}

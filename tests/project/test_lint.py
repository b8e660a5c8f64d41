"""Static checks run with the suite: ruff, the import contracts (mta never imports cluster;
mta and cluster never import the harness, tests or benchmarks; benchmarks and the harness
never import tests), and no test module importing another."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

BIN = Path(sys.executable).parent


def test_ruff_clean() -> None:
    res = subprocess.run([str(BIN / "ruff"), "check", "mta", "cluster", "harness", "tests",
                          "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_import_contracts_are_kept() -> None:
    res = subprocess.run([str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for contract in ("mta never imports cluster",
                     "mta and cluster never import harness, tests or benchmarks",
                     "harness and benchmarks never import tests"):
        assert f"{contract} KEPT" in res.stdout, res.stdout


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/support (or the top-level harness), so a test module can
    be read, moved and run on its own."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            name for name in _imported(path)
            if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_"))
        for path in (ROOT / "tests").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}

"""Static checks run with the suite: ruff, and the contract that mta never imports cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

BIN = Path(sys.executable).parent


def test_ruff_clean() -> None:
    res = subprocess.run([str(BIN / "ruff"), "check", "mta", "cluster", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mta_never_imports_cluster() -> None:
    res = subprocess.run([str(BIN / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mta never imports cluster KEPT" in res.stdout

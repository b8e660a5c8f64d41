"""The one way tests run mtactl: a subprocess against a node's admin API."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from harness.node import NodeProcess


def ctl(node: NodeProcess | str, *args: str, token: str = "t0ken",
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``mtactl ARGS`` against ``node`` (a NodeProcess, or the admin URL of one run in
    process); whatever it answers, never a traceback."""
    url = node if isinstance(node, str) else f"http://127.0.0.1:{node.admin_port}"
    res = subprocess.run([sys.executable, "-m", "mta.cli.ctl", "--url", url, "--token", token,
                          *args], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def ctl_json(node: NodeProcess | str, *args: str) -> Any:
    """``mtactl --json ARGS``, which must succeed, parsed."""
    res = ctl(node, "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def mta(*args: str, cwd: Any) -> subprocess.CompletedProcess[str]:
    """Run ``mta ARGS`` (the daemon's command line, e.g. ``--check``) in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "mta", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    """The refusal of an ``mta`` run: exit 2, nothing on stdout, one line, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]

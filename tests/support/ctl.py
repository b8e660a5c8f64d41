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

"""What a node exports, read from a real node process."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from harness.config import node_config
from harness.node import NodeProcess

__all__ = ["fresh_node_metrics"]


def fresh_node_metrics(work: Path) -> str:
    """``/metrics`` of a fresh standalone node started in ``work`` (no probe configured,
    nothing sent yet), which is stopped again."""
    node = NodeProcess(work, node_config(work / "spool")).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
            return resp.read().decode()
    finally:
        node.kill()

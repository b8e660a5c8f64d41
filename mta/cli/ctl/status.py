"""``mtactl status``: this node at a glance."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import age, call, emit


def run(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/status")
    width = max(len(k) for k in data)
    # The uptime as everywhere else in mtactl (nodes): 1h02m, not seconds.
    shown = {k: age(v) if k == "uptime" and isinstance(v, int | float) else v
             for k, v in data.items()}
    return emit(args, data, "\n".join(f"{k:<{width}}  {v}" for k, v in shown.items()))


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="this node: mode, shards, queue size, readiness")
    p.set_defaults(func=run)

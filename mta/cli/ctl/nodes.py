"""``mtactl nodes``: the members of the cluster."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import age, call, emit, table


def _state(node: dict[str, Any]) -> str:
    if node.get("lease_left") is not None:
        return f"lease expiring ({node['lease_left']:.0f}s left)"
    return str(node.get("state") or ("draining" if node["draining"] else "up"))


def run(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/nodes")
    rows = [(n["node"], "leader" if n["leader"] else "", _state(n), n["shards"], n["smtp"],
             n["admin"], n["version"], age(n["uptime"])) for n in data["nodes"]]
    return emit(args, data, table(rows, ("NODE", "ROLE", "STATE", "SHARDS", "SMTP", "ADMIN",
                                         "VERSION", "UPTIME")))


def register(sub: Any) -> None:
    p = sub.add_parser("nodes", help="cluster members: leader, draining, shards owned")
    p.set_defaults(func=run)

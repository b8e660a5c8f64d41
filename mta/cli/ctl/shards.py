"""``mtactl shards``: who owns which spool shard."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import call, emit, table


def _owner(shard: dict[str, Any]) -> str:
    if shard["owner"] is None:
        return "UNOWNED"
    # Until a dead owner's lease runs out its keys stand; say so rather than look healthy.
    return shard["owner"] + (" (lease expiring)" if shard.get("owner_lease_expiring") else "")


def run(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/shards")
    rows = [(s["shard"], s["assigned"], _owner(s), s["token"]) for s in data["shards"]]
    text = table(rows, ("SHARD", "ASSIGNED", "OWNER", "TOKEN"))
    text += f"\n{data['total'] - data['unowned']} of {data['total']} shards owned"
    return emit(args, data, text)


def register(sub: Any) -> None:
    p = sub.add_parser("shards", help="shard assignment, owner and fencing token")
    p.set_defaults(func=run)

"""``mtactl drain NODE`` / ``mtactl undrain NODE``: move a node's shards away, or back."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import call, emit


def run(args: argparse.Namespace) -> int:
    data = call(args, f"/api/v1/nodes/{args.node}/{args.command}", {})
    text = (f"{args.node} draining: its shards move to the other nodes (watch `mtactl shards`)"
            if data["draining"] else f"{args.node} back in service: it gets shards again")
    return emit(args, data, text)


def register(sub: Any) -> None:
    p = sub.add_parser("drain", help="move every shard off NODE and keep it off")
    p.add_argument("node")
    p.set_defaults(func=run)
    p = sub.add_parser("undrain", help="put a drained NODE back in service")
    p.add_argument("node")
    p.set_defaults(func=run)

"""``mtactl rebalance``: have the leader recompute the shard assignment now."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import CtlError, UsageError, call, emit, table


def run(args: argparse.Namespace) -> int:
    if not 0 < args.timeout <= 3600:
        raise UsageError("--timeout must be between 0 and 3600 seconds")
    data = call(args, "/api/v1/rebalance", {"timeout": args.timeout}, timeout=args.timeout + 15)
    text = (f"{data['moved']} shard(s) moved; "
            + ("converged" if data["converged"] else "NOT converged")
            + f" in {data['seconds']}s (leader {data['leader']})\n"
            + table(sorted(data["per_node"].items()), ("NODE", "SHARDS")))
    emit(args, data, text)
    if not data["converged"]:
        raise CtlError(f"ownership did not settle within {args.timeout:g}s "
                       f"({data['unowned']} shard(s) unowned); check `mtactl shards`")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("rebalance", help="recompute the shard assignment and wait for it")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    p.set_defaults(func=run)

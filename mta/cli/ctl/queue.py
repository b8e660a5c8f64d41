"""``mtactl queue``: what waits, by recipient domain and by delivery site."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import age, call, emit, table, when


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:g}/s"


def run(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/queue", query={"local": "1"} if args.local else None)
    domains = data["domains"][:args.limit] if args.limit else data["domains"]
    rows = [(d["domain"], d["messages"], d["in_flight"], age(d["oldest_age"]),
             "held" if d["suspended"] else when(d["next_attempt"]), _rate(d["throttle"]),
             d["site"]) for d in domains]
    parts = [f"{data['total']} live messages on {len(data['nodes'])} node(s); oldest "
             f"{age(data['oldest_age'])}",
             table(rows, ("DOMAIN", "MSGS", "SENDING", "OLDEST", "NEXT", "THROTTLE", "SITE"))]
    if data["sites"]:
        rows = [(s["site"], s["ready"], f"{s['connections']}/{s['max_connections']}",
                 s["breaker"] + (f" ({age(s['retry_in'])})" if s["retry_in"] else ""),
                 _rate(s["rate"]), s["backoff"]) for s in data["sites"]]
        parts.append(table(rows, ("SITE", "READY", "CONNS", "BREAKER", "RATE", "BACKOFF")))
    for miss in data["unreachable"]:
        parts.append(f"warning: node {miss['node']} did not answer: {miss['error']}")
    return emit(args, data, "\n\n".join(parts))


def register(sub: Any) -> None:
    p = sub.add_parser("queue", help="queue summary by domain and site (cluster-wide)")
    p.add_argument("--local", action="store_true", help="this node only")
    p.add_argument("--limit", type=int, default=0, help="show the N biggest domains")
    p.set_defaults(func=run)

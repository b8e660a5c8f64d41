"""``mtactl flush [--domain D]``: retry waiting messages now."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import call, emit


def run(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/flush", {"domain": args.domain} if args.domain else {})
    what = f"for {args.domain} " if args.domain else ""
    text = f"{data['rescheduled']} waiting messages {what}retried now on {data['nodes']} node(s)"
    for miss in data["unreachable"]:
        text += f"\nwarning: node {miss['node']} did not answer: {miss['error']}"
    return emit(args, data, text)


def register(sub: Any) -> None:
    p = sub.add_parser("flush", help="retry waiting messages now (cluster-wide)")
    p.add_argument("--domain", help="only messages for this domain")
    p.set_defaults(func=run)

"""``mtactl flush [--domain D | --tenant T | --campaign C]``: retry waiting messages now."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import call, emit


def run(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in ("domain", "tenant", "campaign")
             if getattr(args, k)}
    data = call(args, "/api/v1/flush", given)
    what = "".join(f"for {k} {v} " if k != "domain" else f"for {v} " for k, v in given.items())
    text = f"{data['rescheduled']} waiting messages {what}retried now on {data['nodes']} node(s)"
    for miss in data["unreachable"]:
        text += f"\nwarning: node {miss['node']} did not answer: {miss['error']}"
    return emit(args, data, text)


def register(sub: Any) -> None:
    p = sub.add_parser("flush", help="retry waiting messages now (cluster-wide)")
    p.add_argument("--domain", help="only messages for this domain")
    p.add_argument("--tenant", help="only messages sent for this tenant")
    p.add_argument("--campaign", help="only messages of this campaign")
    p.set_defaults(func=run)

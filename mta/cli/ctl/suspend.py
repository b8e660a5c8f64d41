"""``mtactl suspend DOMAIN`` / ``mtactl resume DOMAIN``: hold or release a domain's mail."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import call, emit


def run(args: argparse.Namespace) -> int:
    data = call(args, f"/api/v1/{args.command}", {"domain": args.domain})
    held = ", ".join(data["suspended"]) or "none"
    done = "suspended" if args.command == "suspend" else "resumed"
    return emit(args, data, f"{done} {args.domain}; suspended domains: {held}")


def register(sub: Any) -> None:
    for verb in ("suspend", "resume"):
        p = sub.add_parser(verb, help=f"{verb} delivery to DOMAIN (cluster-wide)")
        p.add_argument("domain")
        p.set_defaults(func=run)

"""``mtactl suspend [--site] KEY`` / ``mtactl resume [--site] KEY``: hold or release the mail
for a domain, every subdomain of one (``*.example.com``), or everything routed to a site."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import UsageError, call, emit

_KEY_HELP = (
    "a domain (example.com: that domain only); *.example.com: every subdomain at any depth "
    "(a.example.com, b.c.example.com) but NOT example.com itself, as in "
    "[delivery.domains]; suspend both to hold all of it. With --site: an MX host "
    "(mx1.example.net), *.suffix of MX hosts (*.mail.protection.outlook.com) or a smarthost "
    "host:port, as [delivery.sites] keys: every domain routed there is held. Keys show as "
    "`site:HOST` and may be given that way too")


def body_of(key: str, site: bool, field: str = "domain") -> dict[str, Any]:
    """The request body naming ``key``: a domain field, or the site (--site)."""
    return {"site": key} if site else {field: key}


def run(args: argparse.Namespace) -> int:
    kind = "tenant" if args.tenant else "campaign" if args.campaign else None
    if sum((args.site, args.tenant, args.campaign)) > 1:
        raise UsageError("give one of --site, --tenant, --campaign")
    body = {kind: args.key} if kind else body_of(args.key, args.site)
    data = call(args, f"/api/v1/{args.command}", body)
    held = ", ".join(data["suspended"]) or "none"
    done = "suspended" if args.command == "suspend" else "resumed"
    what = f"site {args.key}" if args.site else f"{kind} {args.key}" if kind else args.key
    return emit(args, data, f"{done} {what}; suspended domains: {held}")


def register(sub: Any) -> None:
    for verb in ("suspend", "resume"):
        p = sub.add_parser(
            verb, help=f"{verb} delivery to a domain, *.domain or --site (cluster-wide)",
            description=f"{verb.capitalize()} delivery, cluster-wide. Held mail waits in "
                        "the queue without counting attempts, and goes out on resume.")
        p.add_argument("--site", action="store_true",
                       help="KEY is a delivery site (MX host, *.suffix or host:port)")
        p.add_argument("--tenant", action="store_true",
                       help="KEY is a tenant: every message sent for it is held")
        p.add_argument("--campaign", action="store_true",
                       help="KEY is a campaign: every message of it is held")
        p.add_argument("key", metavar="KEY", help=_KEY_HELP)
        p.set_defaults(func=run)

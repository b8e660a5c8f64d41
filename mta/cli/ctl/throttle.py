"""``mtactl throttle show | set [--site] KEY SPEC | clear [--site] KEY``: runtime rate
limits, and what is suspended."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import UsageError, call, emit
from mta.cli.ctl.suspend import body_of


def _kind(key: str) -> str:
    if key.startswith("tenant:"):
        return "tenant"
    if key.startswith("site:"):
        return "site (wildcard)" if key.startswith("site:*.") else "site"
    return "domain (wildcard)" if key.startswith("*.") else "domain"


def _show(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/throttles")
    lines = [f"{'key':<40} {'msgs/s':>10}  source"]
    lines += [f"{k:<40} {v:>10.3f}  runtime, {_kind(k)}"
              for k, v in sorted(data["runtime"].items())]
    lines += [f"{k:<40} {v:>10.3f}  config" for k, v in sorted(data["configured"].items())]
    lines += [f"{'site:' + k:<40} {v:>10.3f}  config"
              for k, v in sorted(data.get("configured_sites", {}).items())]
    lines += [f"{'tenant:' + k:<40} {v:>10.3f}  config"
              for k, v in sorted(data.get("configured_tenants", {}).items())]
    if data["default_site_rate"]:
        lines.append(f"{'(every site)':<40} {data['default_site_rate']:>10.3f}  config")
    held = [f"  {k:<38} {_kind(k)}" for k in data["suspended"]]
    lines += ["", "suspended:", *held] if held else ["", "suspended: none"]
    return emit(args, data, "\n".join(lines))


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        if args.site or args.tenant or args.key:
            raise UsageError("throttle show takes no KEY, --site or --tenant: it shows them "
                             "all")
        return _show(args)
    if args.site and args.tenant:
        raise UsageError("give --site or --tenant, not both")
    if not args.key or (args.action == "set" and not args.spec):
        raise UsageError(f"throttle {args.action} needs KEY"
                         + (" and SPEC (e.g. 100/s)" if args.action == "set" else ""))
    spec = args.spec if args.action == "set" else None
    named = {"tenant": args.key} if args.tenant else body_of(args.key, args.site, "key")
    data = call(args, "/api/v1/throttles", {**named, "spec": spec})
    done = f"set to {args.spec}" if spec else "cleared"
    what = f"site {args.key}" if args.site else f"tenant {args.key}" if args.tenant \
        else args.key
    return emit(args, data, f"throttle for {what} {done}")


def register(sub: Any) -> None:
    p = sub.add_parser("throttle", help="show, set or clear runtime throttles (cluster-wide)")
    p.add_argument("action", choices=("show", "set", "clear"))
    p.add_argument("--site", action="store_true",
                   help="KEY is a delivery site (MX host, *.suffix or host:port)")
    p.add_argument("--tenant", action="store_true",
                   help="KEY is a tenant: its messages, whatever their domains (over its "
                        "[tenants.\"x\"] rate)")
    p.add_argument("key", nargs="?",
                   help="a domain, or *.example.com: each subdomain (not example.com itself) "
                        "gets the rate on its own, as [delivery.domains.\"*.x\"] rate does; "
                        "with --site an MX host, *.suffix or host:port, rate shared by the "
                        "site's connections. Most specific wins: exact domain over wildcard, "
                        "runtime over config")
    p.add_argument("spec", nargs="?", help='a rate such as "100/s", "20/m", "5000/h"')
    p.set_defaults(func=run)

"""``mtactl throttle show | set KEY SPEC | clear KEY``: runtime rate limits."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import UsageError, call, emit


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        data = call(args, "/api/v1/throttles")
        lines = [f"{'key':<32} {'msgs/s':>10}  source"]
        lines += [f"{k:<32} {v:>10.3f}  runtime" for k, v in sorted(data["runtime"].items())]
        lines += [f"{k:<32} {v:>10.3f}  config" for k, v in sorted(data["configured"].items())]
        if data["default_site_rate"]:
            lines.append(f"{'(every site)':<32} {data['default_site_rate']:>10.3f}  config")
        return emit(args, data, "\n".join(lines))
    if not args.key or (args.action == "set" and not args.spec):
        raise UsageError(f"throttle {args.action} needs KEY"
                         + (" and SPEC (e.g. 100/s)" if args.action == "set" else ""))
    spec = args.spec if args.action == "set" else None
    data = call(args, "/api/v1/throttles", {"key": args.key, "spec": spec})
    done = f"set to {args.spec}" if spec else "cleared"
    return emit(args, data, f"throttle for {args.key} {done}")


def register(sub: Any) -> None:
    p = sub.add_parser("throttle", help="show, set or clear runtime throttles (cluster-wide)")
    p.add_argument("action", choices=("show", "set", "clear"))
    p.add_argument("key", nargs="?", help="a domain, or a site (its MX host list)")
    p.add_argument("spec", nargs="?", help='a rate such as "100/s", "20/m", "5000/h"')
    p.set_defaults(func=run)

"""``mtactl slo [--window 1h]``: availability, submission latency and delivery success
against the configured objectives."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import CtlError, call, emit, table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.3f}%"


def run(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/slo", query={"window": args.window})
    c = data["checks"]
    p99 = c["submit_p99_seconds"]["value"]
    rows = [
        ("availability", _pct(c["availability"]["value"]),
         ">= " + _pct(c["availability"]["objective"]), c["availability"]["met"]),
        ("submit p99", "-" if p99 is None else f"<= {p99:g}s",
         f"<= {c['submit_p99_seconds']['objective']:g}s", c["submit_p99_seconds"]["met"]),
        ("delivery success", _pct(c["delivery_success"]["value"]),
         ">= " + _pct(c["delivery_success"]["objective"]), c["delivery_success"]["met"]),
    ]
    text = (f"SLO over {args.window} on {data['nodes']} node(s): "
            + ("all objectives met" if data["objectives_met"] else "OBJECTIVES MISSED") + "\n"
            + table([(n, v, o, "ok" if m else "MISSED") for n, v, o, m in rows],
                    ("OBJECTIVE", "VALUE", "TARGET", "STATUS"))
            + f"\nsubmitted {data['submitted']}, delivered {data['delivered']}, deferred "
              f"{data['deferred']}, failed {data['failed']}")
    for miss in data["unreachable"]:
        text += f"\nwarning: node {miss['node']} did not answer: {miss['error']}"
    emit(args, data, text)
    if args.check and not data["objectives_met"]:
        raise CtlError("objectives missed")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("slo", help="service levels against objectives (cluster-wide)")
    p.add_argument("--window", default="1h", help="15m, 1h, 24h (at most 24h; default 1h)")
    p.add_argument("--check", action="store_true", help="exit 1 when an objective is missed")
    p.set_defaults(func=run)

"""``mtactl message show ID`` and ``mtactl message bounce ID | --domain D``."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import UsageError, age, call, emit, table, when


def _show(args: argparse.Namespace) -> int:
    if not args.id:
        raise UsageError("message show needs a message ID")
    m = call(args, f"/api/v1/messages/{args.id}")
    lines = [f"id           {m['id']}  (shard {m['shard']}, node {m['node']})",
             f"from         <{m['sender']}>",
             f"size         {m['size']} bytes",
             f"age          {age(m['age'])}",
             f"attempts     {m['attempts']}",
             f"next attempt {'in flight' if m['in_flight'] else when(m['next_attempt'])}",
             f"last reply   {m['last_reply'] or '-'}",
             f"client       {m['client_ip'] or '-'} helo={m['helo'] or '-'} "
             f"auth={m['auth_user'] or '-'}",
             "",
             table([(r["address"], r["status"], r.get("reply")) for r in m["recipients"]],
                   ("RECIPIENT", "STATUS", "REPLY")),
             "", m["headers"].rstrip()]
    return emit(args, m, "\n".join(lines))


def _bounce(args: argparse.Namespace) -> int:
    if bool(args.id) == bool(args.domain):
        raise UsageError("message bounce needs a message ID or --domain DOMAIN (not both)")
    if args.id:
        data = call(args, f"/api/v1/messages/{args.id}/bounce", {}, timeout=90)
        return emit(args, data, f"bounced {data['bounced_recipients']} pending recipient(s) of "
                                f"{data['id']}; a DSN goes to the sender")
    data = call(args, "/api/v1/bounce", {"domain": args.domain}, timeout=120)
    text = (f"bounced {data['bounced_recipients']} recipient(s) at {data['domain']} in "
            f"{data['messages']} message(s)")
    for miss in data["unreachable"]:
        text += f"\nwarning: node {miss['node']} did not answer: {miss['error']}"
    return emit(args, data, text)


def run(args: argparse.Namespace) -> int:
    return _show(args) if args.action == "show" else _bounce(args)


def register(sub: Any) -> None:
    p = sub.add_parser("message", help="show one message, or bounce messages now")
    p.add_argument("action", choices=("show", "bounce"))
    p.add_argument("id", nargs="?", help="message id (from the 250 reply or the logs)")
    p.add_argument("--domain", help="bounce: every pending recipient at DOMAIN, cluster-wide")
    p.set_defaults(func=run)

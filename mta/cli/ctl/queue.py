"""``mtactl queue``: what waits, by recipient domain and by delivery site; and, like
Postfix's ``mailq``/``postsuper``, ``queue list`` (the messages, filtered and paged) and
``queue hold|release|delete|bounce`` of every message a filter matches, cluster-wide."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mta.cli.ctl.client import UsageError, age, call, emit, table, when

_FILTERS = ("sender", "recipient", "domain", "older_than", "newer_than", "state",
            "next_before", "tenant", "campaign")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:g}/s"


def _held(d: dict[str, Any]) -> str | None:
    """"held" and the suspension holding it (a wildcard or a site says which); None if not
    held. (A node older than wildcards reports only ``suspended``.)"""
    if d.get("held_by") and d["held_by"] != d.get("domain"):
        return f"held ({d['held_by']})"
    return "held" if d.get("held_by") or d.get("suspended") else None


def _warnings(data: dict[str, Any]) -> list[str]:
    return [f"warning: node {miss['node']} did not answer: {miss['error']}"
            for miss in data["unreachable"]]


def _summary(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/queue", query={"local": "1"} if args.local else None)
    domains = data["domains"][:args.limit] if args.limit else data["domains"]
    rows = [(d["domain"], d["messages"], d["in_flight"], age(d["oldest_age"]),
             _held(d) or when(d["next_attempt"]), _rate(d["throttle"]),
             d["site"]) for d in domains]
    parts = [f"{data['total']} live messages on {len(data['nodes'])} node(s); oldest "
             f"{age(data['oldest_age'])}",
             table(rows, ("DOMAIN", "MSGS", "SENDING", "OLDEST", "NEXT", "THROTTLE", "SITE"))]
    if data["sites"]:
        rows = [(s["site"], s["ready"], f"{s['connections']}/{s['max_connections']}",
                 s["breaker"] + (f" ({age(s['retry_in'])})" if s["retry_in"] else ""),
                 _rate(s["rate"]), s["backoff"],
                 age(s["blocked_for"]) if s.get("blocked_for") else "-",
                 _held(s) or "-") for s in data["sites"]]
        parts.append(table(rows, ("SITE", "READY", "CONNS", "BREAKER", "RATE", "BACKOFF",
                                  "BLOCKED", "HELD")))
    if data.get("tenants"):
        rows = [(t["tenant"] or "-", t["campaign"] or "-", t["messages"], t["in_flight"],
                 age(t["oldest_age"])) for t in data["tenants"]]
        parts.append(table(rows, ("TENANT", "CAMPAIGN", "MSGS", "SENDING", "OLDEST")))
    parts += _warnings(data)
    return emit(args, data, "\n\n".join(parts))


def _filter(args: argparse.Namespace) -> dict[str, str]:
    return {key: getattr(args, key) for key in _FILTERS if getattr(args, key) is not None}


def _next(m: dict[str, Any]) -> str:
    if m["state"] == "held":
        return "held"
    return "sending" if m["in_flight"] else when(m["next_attempt"])


def _rcpts(addresses: list[str]) -> str:
    return "-" if not addresses else addresses[0] + (
        f" (+{len(addresses) - 1})" if len(addresses) > 1 else "")


def _list(args: argparse.Namespace) -> int:
    query = {**_filter(args), "limit": str(args.limit)}
    if args.cursor:
        query["cursor"] = args.cursor
    if args.local:
        query["local"] = "1"
    data = call(args, "/api/v1/queue/messages", query=query)
    rows = [(m["id"], age(m["age"]), m["size"], m["state"], m["attempts"], _next(m),
             f"<{m['sender']}>", _rcpts(m["recipients"])) for m in data["messages"]]
    parts = [table(rows, ("ID", "AGE", "SIZE", "STATE", "TRIES", "NEXT", "SENDER",
                          "RECIPIENTS")),
             f"{len(rows)} message(s) on {len(data['nodes'])} node(s)"
             + (f"; next page: --cursor {data['next_cursor']}" if data["next_cursor"] else "")]
    parts += _warnings(data)
    return emit(args, data, "\n".join(parts))


def _act(args: argparse.Namespace) -> int:
    """hold | release | delete | bounce by filter; delete and bounce only with --yes (else
    the count that would be acted on, and exit 1)."""
    body: dict[str, Any] = _filter(args)
    if not body:
        raise UsageError(f"queue {args.queue_action} needs a filter (--sender, --recipient, "
                         "--domain, --older-than, --newer-than, --state, --next-before, "
                         "--tenant, --campaign); for "
                         f"one message: mtactl message {args.queue_action} ID")
    confirm = args.queue_action in ("delete", "bounce")
    dry_run = confirm and not args.yes
    data = call(args, f"/api/v1/queue/{args.queue_action}", {**body, "dry_run": dry_run},
                timeout=180)
    if dry_run:
        text = (f"{data['matched']} message(s) match on {data['nodes']} node(s); nothing "
                f"done: add --yes to {args.queue_action} them")
        print(json.dumps(data, indent=2) if args.json else text)
        return 1
    done = {"hold": "held", "release": "released", "delete": "deleted",
            "bounce": "bounced"}[args.queue_action]
    text = f"{done} {data['messages']} of {data['matched']} matching message(s)"
    if args.queue_action in ("delete", "bounce"):
        text += f" ({data['recipients']} recipient(s)"
        text += ", no DSN)" if args.queue_action == "delete" else ", a DSN to each sender)"
    if data["failed"]:
        text += f"; {data['failed']} could not be done in time (an attempt in flight): " \
                "run it again"
    lines = [text, *_warnings(data)]
    emit(args, data, "\n".join(lines))
    return 1 if data["failed"] or data["unreachable"] else 0


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "queue_action", None)
    if action is None:
        return _summary(args)
    return _list(args) if action == "list" else _act(args)


def _filter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sender", help="envelope sender, exactly (<> for the null sender)")
    p.add_argument("--recipient", help="a pending recipient, exactly")
    p.add_argument("--domain", help="a pending recipient's domain")
    p.add_argument("--older-than", dest="older_than", metavar="AGE",
                   help="received longer ago than AGE (90, 30m, 2d)")
    p.add_argument("--newer-than", dest="newer_than", metavar="AGE",
                   help="received less than AGE ago")
    p.add_argument("--state", choices=("pending", "held", "deferred"),
                   help="pending (never deferred), deferred (an attempt failed for now), "
                        "held (by an operator)")
    p.add_argument("--next-before", dest="next_before", metavar="DURATION",
                   help="next attempt within DURATION from now (0: due now)")
    p.add_argument("--tenant", help="sent for this tenant (\"\" for mail with none)")
    p.add_argument("--campaign", help="of this campaign: `queue bounce --campaign C --yes` "
                                      "cancels a campaign cluster-wide")


def register(sub: Any) -> None:
    p = sub.add_parser("queue", help="queue summary by domain and site; list, hold, release, "
                                     "delete, bounce messages (cluster-wide)")
    p.add_argument("--local", action="store_true", help="this node only")
    p.add_argument("--limit", type=int, default=0, help="show the N biggest domains")
    p.set_defaults(func=run, queue_action=None)
    actions = sub.nested(p, "queue_action")
    lp = actions.add_parser("list", help="the queued messages, oldest first (like mailq)")
    _filter_options(lp)
    lp.add_argument("--limit", type=int, default=100, help="messages per page (1-1000)")
    lp.add_argument("--cursor", help="the next page, as the previous page said")
    lp.add_argument("--local", action="store_true", help="this node only")
    for action, text in (("hold", "hold every message the filter matches"),
                         ("release", "release every held message the filter matches"),
                         ("delete", "delete, without a DSN, what the filter matches"),
                         ("bounce", "bounce, with a DSN, what the filter matches")):
        ap = actions.add_parser(action, help=text)
        _filter_options(ap)
        if action in ("delete", "bounce"):
            ap.add_argument("--yes", action="store_true",
                            help="do it (without: print how many match, exit 1)")

"""``mtactl message``: one message by id, like Postfix's ``postcat``/``postsuper``/``postqueue
-i``: ``show ID [--headers] [--body]``, ``bounce ID | --domain D``, ``hold ID``, ``release
ID``, ``delete ID`` (no DSN) and ``retry ID`` (try it now)."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import CtlError, UsageError, age, call, emit, table, when

DEFAULT_MAX_BYTES = 65536


def _part(args: argparse.Namespace) -> str | None:
    if args.headers and args.body:
        return "all"
    return "headers" if args.headers else "body" if args.body else None


def _content(m: dict[str, Any]) -> list[str]:
    content = m.get("content")
    if content is None:
        return ["", m["headers"].rstrip()]
    lines = ["", content["text"].rstrip("\r\n")]
    if content["truncated"]:
        lines.append(f"[... {content['bytes']} bytes in all; shown up to --max-bytes]")
    return lines


def _show(args: argparse.Namespace) -> int:
    query = {"max_bytes": str(args.max_bytes)}
    if (part := _part(args)) is not None:
        query["part"] = part
    m = call(args, f"/api/v1/messages/{args.id}", query=query)
    state = "held" if m["held"] else "in flight" if m["in_flight"] else when(m["next_attempt"])
    lines = [f"id           {m['id']}  (shard {m['shard']}, node {m['node']})",
             f"from         <{m['sender']}>",
             f"size         {m['size']} bytes",
             f"age          {age(m['age'])}",
             f"attempts     {m['attempts']}",
             f"next attempt {state}",
             f"last reply   {m['last_reply'] or '-'}",
             f"client       {m['client_ip'] or '-'} helo={m['helo'] or '-'} "
             f"auth={m['auth_user'] or '-'}",
             "",
             table([(r["address"], r["status"], r["deferrals"] or "-", r["remote"],
                     r["reply"]) for r in m["recipients"]],
                   ("RECIPIENT", "STATUS", "DEFERRALS", "REMOTE", "LAST REPLY")),
             *_content(m)]
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


def _hold(args: argparse.Namespace) -> int:
    data = call(args, f"/api/v1/messages/{args.id}/{args.action}", {}, timeout=90)
    if not data["changed"]:
        # A no-op the operator wants to hear about (a typo'd id answers 404 instead); on
        # stderr like every refusal, so nothing but JSON ever reaches stdout with --json.
        raise CtlError(f"{data['id']} was {'already' if data['held'] else 'not'} held")
    return emit(args, data, f"{data['id']} {'held' if data['held'] else 'released'} on "
                            f"{data['node']}")


def _delete(args: argparse.Namespace) -> int:
    data = call(args, f"/api/v1/messages/{args.id}/delete", {}, timeout=90)
    return emit(args, data, f"deleted {data['id']} ({data['deleted_recipients']} pending "
                            "recipient(s), no DSN)")


def _retry(args: argparse.Namespace) -> int:
    data = call(args, f"/api/v1/messages/{args.id}/retry", {})
    said = {"scheduled": "will be tried now", "in_flight": "is being tried already"}
    return emit(args, data, f"{data['id']} {said.get(data['result'], data['result'])}")


_ACTIONS = {"show": _show, "hold": _hold, "release": _hold, "delete": _delete,
            "retry": _retry}


def run(args: argparse.Namespace) -> int:
    if args.action == "bounce":
        return _bounce(args)
    if not args.id:
        raise UsageError(f"message {args.action} needs a message ID")
    if args.action != "show" and (args.headers or args.body):
        raise UsageError("--headers and --body go with message show")
    if args.max_bytes < 1:
        raise UsageError("--max-bytes must be at least 1")
    return _ACTIONS[args.action](args)


def register(sub: Any) -> None:
    p = sub.add_parser("message", help="show one message (its content too), hold, release, "
                                       "delete, retry it, or bounce messages now")
    p.add_argument("action", choices=("show", "bounce", "hold", "release", "delete", "retry"))
    p.add_argument("id", nargs="?", help="message id (from the 250 reply or the logs)")
    p.add_argument("--domain", help="bounce: every pending recipient at DOMAIN, cluster-wide")
    p.add_argument("--headers", action="store_true", help="show: the message's headers")
    p.add_argument("--body", action="store_true",
                   help="show: the message's body (with --headers: the whole message)")
    p.add_argument("--max-bytes", dest="max_bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"show: at most this much content (default {DEFAULT_MAX_BYTES})")
    p.set_defaults(func=run)

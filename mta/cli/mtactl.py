"""``mtactl``: operate an mta node over its admin API.

Exit codes: 0 ok, 1 the operation failed (node unreachable, refused), 2 usage error.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:8025"


class CtlError(Exception):
    """An operation failed; the message says what is wrong and what to try."""


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


def _request(url: str, token: str, path: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
            raise CtlError(f"{body.get('error', exc.reason)} ({exc.code}); "
                           f"{body.get('hint', '')}".rstrip("; ")) from None
        except ValueError:
            raise CtlError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CtlError(f"node not reachable at {url}: {reason}; is it running? "
                       "check --url or MTACTL_URL") from None


def _cmd_status(args: argparse.Namespace) -> int:
    data = _request(args.url, args.token, "/api/v1/status")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _print(args: argparse.Namespace, data: Any, human: str) -> int:
    print(json.dumps(data, indent=2) if args.json else human)
    return 0


def _cmd_flush(args: argparse.Namespace) -> int:
    data = _request(args.url, args.token, "/api/v1/flush",
                    {"domain": args.domain} if args.domain else {})
    what = f"for {args.domain} " if args.domain else ""
    return _print(args, data, f"{data['rescheduled']} waiting messages {what}retried now")


def _cmd_suspend(args: argparse.Namespace) -> int:
    path = "/api/v1/suspend" if args.command == "suspend" else "/api/v1/resume"
    data = _request(args.url, args.token, path, {"domain": args.domain})
    held = ", ".join(data["suspended"]) or "none"
    return _print(args, data, f"{args.command}d {args.domain}; suspended domains: {held}")


def _cmd_throttle(args: argparse.Namespace) -> int:
    if args.action == "show":
        data = _request(args.url, args.token, "/api/v1/throttles")
        lines = [f"{'key':<32} {'msgs/s':>10}  source"]
        lines += [f"{k:<32} {v:>10.3f}  runtime" for k, v in sorted(data["runtime"].items())]
        lines += [f"{k:<32} {v:>10.3f}  config" for k, v in sorted(data["configured"].items())]
        if data["default_site_rate"]:
            lines.append(f"{'(every site)':<32} {data['default_site_rate']:>10.3f}  config")
        return _print(args, data, "\n".join(lines))
    if not args.key or (args.action == "set" and not args.spec):
        raise UsageError(f"throttle {args.action} needs KEY" +
                         (" and SPEC (e.g. 100/s)" if args.action == "set" else ""))
    spec = args.spec if args.action == "set" else None
    data = _request(args.url, args.token, "/api/v1/throttles", {"key": args.key, "spec": spec})
    done = f"set to {args.spec}" if spec else "cleared"
    return _print(args, data, f"throttle for {args.key} {done}")


def _cmd_passwd(args: argparse.Namespace) -> int:
    from mta.ingress.auth import hash_password

    password = os.environ.get("MTA_PASSWORD") or getpass.getpass(f"password for {args.user}: ")
    if not password:
        raise CtlError("empty password refused")
    print(f"{args.user}:{hash_password(password)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtactl", description="Operate an mta node.")
    parser.add_argument("--url", default=os.environ.get("MTACTL_URL", DEFAULT_URL),
                        help=f"admin API base URL (env MTACTL_URL, default {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("MTACTL_TOKEN", ""),
                        help="admin API token (env MTACTL_TOKEN)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("status", help="node status")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("flush", help="retry waiting messages now")
    p.add_argument("--domain", help="only messages for this domain")
    p.set_defaults(func=_cmd_flush)
    for verb in ("suspend", "resume"):
        p = sub.add_parser(verb, help=f"{verb} delivery to DOMAIN (cluster-wide)")
        p.add_argument("domain")
        p.set_defaults(func=_cmd_suspend)
    p = sub.add_parser("throttle", help="show, set or clear runtime throttles")
    p.add_argument("action", choices=("show", "set", "clear"))
    p.add_argument("key", nargs="?", help="a domain, or a site (its MX host list)")
    p.add_argument("spec", nargs="?", help='a rate such as "100/s", "20/m", "5000/h"')
    p.set_defaults(func=_cmd_throttle)
    p = sub.add_parser("passwd", help="print a users-file line for USER (reads the password)")
    p.add_argument("user")
    p.set_defaults(func=_cmd_passwd)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"mtactl: {exc}", file=sys.stderr)
        return 2
    except CtlError as exc:
        print(f"mtactl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())

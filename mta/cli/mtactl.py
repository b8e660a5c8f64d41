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


def _request(url: str, token: str, path: str) -> Any:
    req = urllib.request.Request(url.rstrip("/") + path,
                                 headers={"Authorization": f"Bearer {token}"})
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
    p = sub.add_parser("passwd", help="print a users-file line for USER (reads the password)")
    p.add_argument("user")
    p.set_defaults(func=_cmd_passwd)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CtlError as exc:
        print(f"mtactl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
